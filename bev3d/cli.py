"""The `bev3d` command line. Heavy modules are imported only by the subcommand that needs them,
so `bev3d --help` stays fast."""

import argparse
import importlib
import sys

from bev3d.errors import Bev3dError

EPILOG = """examples:
  bev3d demo                                         synthetic rig -> train tiny PETR -> metrics -> pictures
  bev3d synth --out data/synth                       write the synthetic rig in nuScenes format
  bev3d train --cfg petr_r50_nus.yaml --data-root data/nuscenes
  bev3d test --cfg petr_tiny_synth --ckpt work_dirs/petr_tiny_synth/latest.pth
  bev3d eval --results results_nusc.json --data-root data/synth --version v1.0-mini --split mini_val
  bev3d export --cfg petr_tiny_synth --ckpt work_dirs/petr_tiny_synth/latest.pth --out petr.onnx --check
"""


def _add_synth(sub):
    p = sub.add_parser(
        "synth",
        help="write the synthetic camera rig as a nuScenes-format dataset",
        epilog="examples:\n  bev3d synth --out data/synth --seed 0\n"
               "  bev3d synth --out data/synth_fixed --style fixed --image-size 1600x900\n"
               "  bev3d synth --out data/synth_heldout --style-seed 1000 --image-size 800x450",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (the dataset root)")
    p.add_argument("--kind", choices=["nuscenes", "shapes2d"], default="nuscenes",
                   help="nuscenes: 6-camera rig in nuScenes v1.0-mini format; shapes2d: COCO-format 2D shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-scenes", type=int, default=None, help="number of mini_train scenes (at most 8)")
    p.add_argument("--samples-per-scene", type=int, default=None, help="key frames per scene at 2 Hz (default 80)")
    p.add_argument("--image-size", type=_image_size, default=None,
                   help="WIDTHxHEIGHT of every image (nuscenes default: each random-style scene draws one of "
                        "1600x900 .. 800x450, fixed style 1600x900; intrinsics scaled to match; shapes2d: 128x128)")
    p.add_argument("--style", choices=["random", "fixed"], default="random",
                   help="nuscenes: random: each scene its own look (colours and textures independent of class, "
                        "ground, sky, light, traffic, camera response); fixed: the rig's original look")
    p.add_argument("--style-seed", type=int, default=0,
                   help="seed of the random styles (independent of --seed, which draws the layout); seeds >= 1000 "
                        "are reserved for held-out evaluation sets")
    p.add_argument("--num-images", type=int, default=None, help="shapes2d only: number of images")


def _image_size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like WIDTHxHEIGHT (e.g. 1600x900), got {text!r}") from None
    if width < 32 or height < 32:
        raise argparse.ArgumentTypeError(f"{text} is too small: use at least 32x32")
    return width, height


def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train a model from a config",
        epilog="examples:\n  bev3d train --cfg petr_r50_nus.yaml --data-root data/nuscenes\n"
        "  bev3d train --cfg petr_tiny_synth --opts train.max_epochs=2 data.batch_size=2\n"
        "  torchrun --nproc_per_node=8 -m bev3d train --cfg petr_r50_nus",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_cfg_args(p)
    p.add_argument("--work-dir", help="where checkpoints, logs and the resolved config go")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from CKPT, or from the latest checkpoint in the work dir when no path is given")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def _add_test(sub):
    p = sub.add_parser(
        "test",
        help="run inference on the validation split, write results_nusc.json and evaluate",
        epilog="example:\n  bev3d test --cfg petr_tiny_synth --ckpt work_dirs/petr_tiny_synth/latest.pth --out out/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_cfg_args(p)
    p.add_argument("--ckpt", required=True,
                   help="checkpoint written by bev3d train or bev3d convert (convert an official one first)")
    p.add_argument("--out", help="output directory for results and metrics")
    p.add_argument("--plots", action="store_true", help="also render the devkit's PR curves")


def _add_eval(sub):
    p = sub.add_parser(
        "eval",
        help="evaluate a nuScenes results file with the devkit's DetectionEval",
        epilog="example:\n  bev3d eval --results results_nusc.json --data-root data/synth --version v1.0-mini "
        "--split mini_val --out eval/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--results", required=True, help="results JSON in the nuScenes submission format")
    p.add_argument("--data-root", required=True)
    p.add_argument("--version", default="v1.0-mini")
    p.add_argument("--split", default="mini_val")
    p.add_argument("--out", help="output directory (default: beside the results file)")
    p.add_argument("--plots", action="store_true", help="also render the devkit's PR curves")


def _add_vis(sub):
    p = sub.add_parser(
        "vis",
        help="render 3D scenes (Open3D), camera mosaics and BEV plots",
        epilog="example:\n  bev3d vis --data-root data/synth --index 0 --results out/results_nusc.json --out vis/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-root", required=True)
    p.add_argument("--version", default="v1.0-mini")
    p.add_argument("--results", help="results JSON to draw predictions from")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sample", help="sample token")
    which.add_argument("--index", type=int, help="index of the sample in the dataset")
    which.add_argument("--scene", help="scene name: renders every sample into a video")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--score-thr", type=float, default=0.3)
    p.add_argument("--show", action="store_true", help="open an interactive Open3D window instead")


def _add_demo(sub):
    p = sub.add_parser(
        "demo",
        help="synthetic rig -> train tiny PETR -> nuScenes metrics -> pictures",
        epilog="example:\n  bev3d demo --work-dir work_dirs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-root", default=None, help="synthetic dataset cache (written if absent)")
    p.add_argument("--work-dir", default="work_dirs/demo")
    p.add_argument("--cfg", default="petr_tiny_synth.yaml")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")


def _add_convert(sub):
    from bev3d.models.convert import FAMILIES

    p = sub.add_parser(
        "convert",
        help="convert an official checkpoint to a bev3d checkpoint of a config",
        epilog="example:\n  bev3d convert detr-r50-e632da11.pth --from detr --cfg detr_r50_coco --out detr_r50.pth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="the official checkpoint file")
    p.add_argument("--from", required=True, choices=sorted(FAMILIES), help="the family (code base) it comes from")
    p.add_argument("--cfg", required=True, help="the bev3d config of the same architecture")
    p.add_argument("--out", required=True, help="the bev3d checkpoint to write")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def _add_export(sub):
    p = sub.add_parser(
        "export",
        help="export a model to ONNX (standard operators), optionally checked in onnxruntime",
        epilog="examples:\n  bev3d export --cfg petr_tiny_synth --ckpt work_dirs/petr_tiny_synth/latest.pth "
        "--out petr.onnx --check\n  bev3d export --cfg detr_tiny_shapes --out detr.onnx --postprocess --batch 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_cfg_args(p)
    p.add_argument("--ckpt", help="checkpoint written by bev3d train or bev3d convert (default: the config's "
                   "model.weights, else random weights, e.g. to try the export)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, at least 16 (GridSample)")
    p.add_argument("--batch", type=int, default=1, help="samples in the example batch (the batch axis is dynamic)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and activations")
    p.add_argument("--postprocess", action="store_true",
                   help="top-k decoding to scores, labels, boxes in the graph (else raw logits and box codes)")
    p.add_argument("--check", action="store_true",
                   help="run the file in onnxruntime on a sample: max difference and latency against PyTorch")
    p.add_argument("--threads", type=int, default=None, help="--check: CPU threads of onnxruntime and PyTorch")


def _add_build_ops(sub):
    p = sub.add_parser(
        "build-ops",
        help="compile the C++/CUDA deformable attention kernels ahead of time",
        epilog="example:\n  bev3d build-ops --verbose",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--verbose", action="store_true")


def _add_cfg_args(p):
    p.add_argument("--cfg", required=True, help="config path or shipped name (e.g. petr_r50_nus)")
    p.add_argument("--data-root", help="dataset root (overrides data.root)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.lr=1e-4 data.image_size=[256,704]")


# subcommand -> module whose main(args) runs it
COMMANDS = {
    "synth": "bev3d.data.synthetic",
    "train": "bev3d.engine.train",
    "test": "bev3d.engine.test",
    "eval": "bev3d.evaluation.nuscenes_eval",
    "vis": "bev3d.vis.cli",
    "demo": "bev3d.engine.demo",
    "convert": "bev3d.models.convert",
    "export": "bev3d.engine.export",
    "build-ops": "bev3d.ops.build",
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="bev3d",
        description="Multi-camera 3D object detection (DETR3D, PETR) with the official nuScenes metrics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_synth, _add_train, _add_test, _add_eval, _add_vis, _add_demo, _add_convert, _add_export,
                _add_build_ops):
        add(sub)
    return parser


def _dry_run(args):
    from bev3d.config import cli_overrides, dump_config, load_config

    print(dump_config(load_config(args.cfg, cli_overrides(args))), end="")
    return 0


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its message
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "train" and args.dry_run:
            return _dry_run(args)
        module = importlib.import_module(COMMANDS[args.command])
        return module.main(args) or 0
    except Bev3dError as e:
        if debug:
            raise
        print(f"bev3d {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bev3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
