"""Open3D side of the 3D pictures: turns the plain-array scene of bev3d.vis.scene3d into Open3D
geometry, and renders frames headless when run as `python -m bev3d.vis._o3d_worker IN OUT`.

The renderer runs in this child process so that a crash inside the native code (a missing
Vulkan driver, a bad EGL setup) becomes an error message in the parent instead of killing it.
"""

import pickle
import sys

import numpy as np


def to_open3d(scene):
    """Plain-array scene -> list of (name, open3d geometry, MaterialRecord)."""
    import open3d as o3d
    from open3d.visualization import rendering

    def vec3(a):
        # Open3D copies element by element (very slowly) from non-contiguous arrays
        return o3d.utility.Vector3dVector(np.ascontiguousarray(a, dtype=np.float64))

    out = []
    if scene.get("points") is not None:
        pcd = o3d.geometry.PointCloud(vec3(scene["points"]["xyz"]))
        pcd.colors = vec3(scene["points"]["colors"])
        mat = rendering.MaterialRecord()
        mat.shader = "defaultUnlit"
        mat.point_size = float(scene["points"]["size"])
        out.append(("points", pcd, mat))
    for mesh in scene["meshes"]:
        tm = o3d.geometry.TriangleMesh(
            vec3(mesh["vertices"]), o3d.utility.Vector3iVector(np.ascontiguousarray(mesh["triangles"], dtype=np.int32))
        )
        tm.paint_uniform_color(mesh["color"])
        mat = rendering.MaterialRecord()
        mat.shader = "defaultUnlit"
        out.append((mesh["name"], tm, mat))
    for group in scene["lines"]:
        ls = o3d.geometry.LineSet(
            vec3(group["points"]), o3d.utility.Vector2iVector(np.ascontiguousarray(group["lines"], dtype=np.int32))
        )
        ls.colors = vec3(group["colors"])
        mat = rendering.MaterialRecord()
        mat.shader = "unlitLine"
        mat.line_width = float(group["width"])
        out.append((group["name"], ls, mat))
    return out


def render_frames(frames):
    """frames: list of {"scene": plain scene, "views": {name: (K (3,3), world2cam (4,4), width, height)}}.

    Returns a list (per frame) of {view name: (H, W, 3) uint8 RGB}.
    """
    from open3d.visualization import rendering

    renderers = {}
    results = []
    for frame in frames:
        geometry = to_open3d(frame["scene"])
        images = {}
        sizes = sorted({(w, h) for _, _, w, h in frame["views"].values()})
        for size in sizes:
            if size not in renderers:
                renderers[size] = rendering.OffscreenRenderer(*size)
                # No tone mapping or colour grading: pixels keep the exact colours we draw with.
                renderers[size].scene.view.set_post_processing(False)
            r = renderers[size]
            r.scene.clear_geometry()
            r.scene.set_background(list(frame["scene"]["background"]))
            for name, geom, material in geometry:
                r.scene.add_geometry(name, geom, material)
            for view, (K, world2cam, width, height) in frame["views"].items():
                if (width, height) == size:
                    r.setup_camera(np.asarray(K, dtype=np.float64), np.asarray(world2cam, dtype=np.float64),
                                   width, height)
                    images[view] = np.asarray(r.render_to_image()).copy()
        results.append(images)
    return results


def main(argv):
    with open(argv[0], "rb") as f:
        frames = pickle.load(f)
    results = render_frames(frames)
    with open(argv[1], "wb") as f:
        pickle.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
