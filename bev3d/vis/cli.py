"""`bev3d vis`: pictures of one sample (--sample / --index) or a video of a scene (--scene)."""

from bev3d.vis.sample import render_sample, render_scene_video


def main(args):
    if args.scene is not None:
        if args.show:
            print("[vis] --show opens a window for one sample (--sample or --index); writing the video only.")
        path = render_scene_video(args.data_root, args.version, args.scene, args.results, args.out, args.score_thr)
        print(f"[vis] wrote {path}")
        return 0
    which = args.sample if args.sample is not None else args.index
    render_sample(args.data_root, args.version, which, args.results, args.out, args.score_thr, show=args.show)
    return 0
