"""`bev3d test`: a checkpoint's inference on the validation split and its metrics (nuScenes: results_nusc.json
in the submission format -> the devkit's DetectionEval; COCO: box AP)."""

from pathlib import Path

from bev3d.config import cli_overrides, load_config
from bev3d.engine import distributed as dist
from bev3d.engine.inference import evaluate
from bev3d.errors import Bev3dError


def load_weights(model, ckpt_path, cfg_name="CONFIG"):
    """A bev3d checkpoint into `model` (strict); an official one is an error that gives the convert command."""
    from bev3d.models.weights import read_model_weights

    try:
        model.load_state_dict(read_model_weights(ckpt_path, cfg_name))
    except RuntimeError as e:
        raise Bev3dError(f"Checkpoint {ckpt_path} does not fit the model of this config: "
                         f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}. "
                         f"Use the config the checkpoint was trained with.") from None


def evaluate_checkpoint(cfg, ckpt, out_dir=None, plots=False, cfg_name="CONFIG"):
    """Evaluate checkpoint `ckpt` of config `cfg` -> (flat metrics, or None off rank 0; timing stats)."""
    from bev3d.data import build_dataset
    from bev3d.evaluation.evaluators import build_evaluator
    from bev3d.models import build_model, build_postprocess

    device = dist.init_distributed()
    try:
        model = build_model(cfg).to(device)
        load_weights(model, ckpt, cfg_name)
        out_dir = Path(out_dir) if out_dir else Path(cfg.work_dir) / "test"
        dataset = build_dataset(cfg, cfg.data.val_split)
        metrics, stats = evaluate(cfg, model, build_postprocess(cfg), build_evaluator(cfg, dataset), dataset, out_dir,
                                  device, plots=plots)
        if dist.is_main_process():
            print(f"\n{stats['samples']} samples, inference {stats['s_per_sample'] * 1000:.1f} ms/sample "
                  f"({dist.get_world_size()} process(es)), evaluation {stats['eval_s']:.1f} s; results and "
                  f"metrics in {out_dir}")
        return metrics, stats
    finally:
        dist.cleanup()


def main(args):
    cfg = load_config(args.cfg, cli_overrides(args))
    cfg_name = " ".join([args.cfg] + (["--opts", *args.opts] if args.opts else []))  # for the convert command
    evaluate_checkpoint(cfg, args.ckpt, args.out, plots=args.plots, cfg_name=cfg_name)
    return 0
