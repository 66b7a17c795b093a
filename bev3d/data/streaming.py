"""Streaming order for temporal models (StreamPETR): samples walked scene by scene in time order.

Training: every epoch the scene segments are shuffled with (seed, epoch), concatenated, and the frame sequence
is cut into `interleave * num_replicas * batch_size` equal streams, taken in `interleave` groups in turn: at step
s of an epoch batch row b of rank r shows frame s // interleave of stream ((s % interleave) * num_replicas + r) *
batch_size + b, so that consecutive steps show different scenes. A frame is marked `first` at the start of a
segment and of a stream: the model starts a fresh memory there. The order depends only on (seed, epoch), so a
resume part-way through an epoch continues the same streams. Testing: each process takes whole scenes
(`scenes_for_rank`), frames in time order.
"""

import math

import torch


def scene_sequences(dataset):
    """Index lists of a NuScenesDataset's scenes, each in time order; scenes in the order they first appear."""
    scenes = {}
    for i in range(len(dataset)):
        info = dataset.get_info(i)
        scenes.setdefault(info["scene_token"], []).append((info["timestamp"], i))
    return [[i for _, i in sorted(frames)] for frames in scenes.values()]


def split_segments(sequences, segments):
    """Cut every sequence into `segments` contiguous parts of nearly equal length (empty parts are dropped)."""
    out = []
    for seq in sequences:
        step = math.ceil(len(seq) / segments)
        out += [seq[k:k + step] for k in range(0, len(seq), step)]
    return out


def scenes_for_rank(sequences, rank, world_size):
    """(index, first) pairs of the scenes of this rank (every world_size-th scene), each in time order."""
    return [(i, k == 0) for seq in sequences[rank::world_size] for k, i in enumerate(seq)]


class StreamingBatchSampler:
    """Yields per step this rank's batch: `batch_size` (index, first) pairs, one per stream (see the module doc)."""

    def __init__(self, segments, batch_size, num_replicas=1, rank=0, seed=0, shuffle=True, interleave=1):
        self.segments, self.batch_size = [list(s) for s in segments], batch_size
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.interleave = interleave
        self.num_streams = interleave * num_replicas * batch_size
        self.frames_per_stream = sum(len(s) for s in self.segments) // self.num_streams
        self.steps = self.frames_per_stream * interleave  # per epoch
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def streams(self):
        """-> num_streams lists of `frames_per_stream` (index, first) pairs, for the current epoch."""
        order = range(len(self.segments))
        if self.shuffle:
            order = torch.randperm(len(self.segments), generator=torch.Generator().manual_seed(
                self.seed * 100003 + self.epoch)).tolist()
        frames = [(i, k == 0) for s in order for k, i in enumerate(self.segments[s])]
        T = self.frames_per_stream
        return [[(i, first or t == 0) for t, (i, first) in enumerate(frames[n * T:(n + 1) * T])]
                for n in range(self.num_streams)]

    def __iter__(self):
        streams, B = self.streams(), self.batch_size
        for s in range(self.skip, self.steps):
            first = ((s % self.interleave) * self.num_replicas + self.rank) * B
            yield [stream[s // self.interleave] for stream in streams[first:first + B]]

    def __len__(self):
        return self.steps - self.skip


class StreamingDataset(torch.utils.data.Dataset):
    """dataset[(index, first)] -> dataset[index] with `prev_exists = not first` (collated into the batch)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, first = key
        return {**self.dataset[index], "prev_exists": not first}
