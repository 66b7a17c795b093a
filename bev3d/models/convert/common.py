"""Key bookkeeping for converting an official state dict: every source tensor is used once or dropped
with a reason, every model tensor is filled once, shapes agree."""

import torch

from bev3d.errors import Bev3dError


class KeyMap:
    """Builds a bev3d state dict from an official one.

    `take(key)` returns a source tensor and marks it used; `put(key, tensor)` fills a model key; `rename`,
    `rename_prefix` and `split_in_proj` are the common cases; `drop(keys, why)` records deliberate drops,
    `drop_copies` those of repeated modules after checking that they are copies.
    `finish(model_state)` checks the accounting against the model's own state dict and returns the result.
    """

    def __init__(self, source, family):
        self.source, self.family = dict(source), family
        self.used, self.dropped, self.out = set(), {}, {}

    def has(self, key):
        return key in self.source

    def take(self, key):
        if key not in self.source:
            raise Bev3dError(f"The {self.family} checkpoint has no tensor {key!r}: it is not a {self.family} "
                             f"checkpoint of this config, or a layout this converter does not know.")
        if key in self.used:
            raise ValueError(f"converter bug: {key} used twice")
        self.used.add(key)
        return self.source[key]

    def put(self, key, tensor):
        if key in self.out:
            raise ValueError(f"converter bug: {key} filled twice")
        self.out[key] = tensor

    def rename(self, src, dst):
        self.put(dst, self.take(src))

    def rename_prefix(self, src_prefix, *dst_prefixes):
        """Every unused source key under `src_prefix` -> the same key under each of `dst_prefixes` (more than one
        where the model holds one module under several names); returns how many source keys."""
        keys = [k for k in self.source if k.startswith(src_prefix) and k not in self.used]
        for k in keys:
            tensor = self.take(k)
            for dst_prefix in dst_prefixes:
                self.put(dst_prefix + k[len(src_prefix):], tensor)
        return len(keys)

    def split_in_proj(self, src_prefix, dst_prefix):
        """nn.MultiheadAttention's packed `in_proj_{weight,bias}` (3C rows: q, k, v) -> `q_proj`, `k_proj`,
        `v_proj`; `out_proj` keeps its name."""
        for kind in ("weight", "bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), self.take(f"{src_prefix}in_proj_{kind}").chunk(3)):
                self.put(f"{dst_prefix}{name}.{kind}", part.clone())
            self.rename(f"{src_prefix}out_proj.{kind}", f"{dst_prefix}out_proj.{kind}")

    def drop(self, keys, why):
        for k in keys:
            if k in self.used:
                raise ValueError(f"converter bug: {k} used and dropped")
            self.used.add(k)
            self.dropped[k] = why

    def drop_matching(self, predicate, why):
        self.drop([k for k in self.source if k not in self.used and predicate(k)], why)

    def drop_copies(self, prefix, of_prefix):
        """Drop every source key under `prefix` as a copy of the same key under `of_prefix` (a module the
        official model holds twice); an error unless both exist and are equal. Returns how many."""
        keys = [k for k in self.source if k.startswith(prefix) and k not in self.used]
        if not keys:
            raise Bev3dError(f"The {self.family} checkpoint has no tensors under {prefix!r}: it is not a {self.family} "
                             f"checkpoint of this config, or a layout this converter does not know.")
        for k in keys:
            original = of_prefix + k[len(prefix):]
            if original not in self.source or not torch.equal(self.source[k], self.source[original]):
                raise Bev3dError(f"The {self.family} checkpoint's {k} should be a copy of {original}, but "
                                 f"{'there is none' if original not in self.source else 'they differ'}: the file "
                                 f"is not of this config's architecture.")
        self.drop(keys, f"copy of {of_prefix}*")
        return len(keys)

    def finish(self, model_state):
        """-> the converted state dict, after checking it fills `model_state` exactly (names and shapes) and
        that no source tensor was left over."""
        unmatched = [k for k in self.source if k not in self.used]
        if unmatched:
            raise Bev3dError(f"{len(unmatched)} tensors of the {self.family} checkpoint fit nothing in this model, "
                             f"first: {unmatched[:5]}. Check --from and --cfg (the config must be the checkpoint's "
                             f"architecture).")
        skip = ("num_batches_tracked",)
        missing = [k for k in model_state if k not in self.out and not k.endswith(skip)]
        extra = [k for k in self.out if k not in model_state]
        wrong = [f"{k} {tuple(self.out[k].shape)} vs model {tuple(model_state[k].shape)}" for k in self.out
                 if k in model_state and self.out[k].shape != model_state[k].shape]
        if missing or extra or wrong:
            raise Bev3dError(f"The converted {self.family} checkpoint does not fit the model of this config: "
                             f"{len(missing)} model tensors unfilled (first: {missing[:5]}), {len(extra)} unknown "
                             f"(first: {extra[:5]}), {len(wrong)} of another shape (first: {wrong[:3]}). Use the "
                             f"config of the checkpoint's architecture.")
        state = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in self.out.items()}
        for k in model_state:
            if k.endswith(skip) and k not in state:
                state[k] = model_state[k]
        return state
