"""Reduce the Panda (robosuite) and ARX5 (robosuite-models) meshes to a few thousand faces per link.

Why: on the CPU-only machines we run on (llvmpipe), render time follows triangle count once shadows are
off; the original meshes (127k faces for the Panda's visual meshes, 218k per ARX5 arm) make a 224x224
frame cost 30+ ms, too slow for a 15-20 Hz control loop with 2-3 cameras. This runs once, offline, in a
throwaway venv (`pip install trimesh fast-simplification pillow scipy networkx rtree`), never at run time:

    pip download --no-deps robosuite==1.5.2 robosuite-models==1.0.0 -d /tmp/x
    /tmp/meshvenv/bin/python scripts/decimate_meshes.py \
        --robosuite /tmp/x/robosuite-1.5.2-py3-none-any.whl \
        --robosuite-models /tmp/x/robosuite_models-1.0.0-1-py3-none-any.whl

Each link's visual parts are grouped by colour (robosuite splits a link into many coloured parts), the
group transform baked in, vertices merged, and quadric-decimated to a per-link face budget split across
the groups by their share of faces. Output: binary STL per (link, colour) plus a `meshes.json` manifest
(body -> [{file, rgba, faces}]) that the scene builder reads, and the wheels' LICENSE files.
"""

from __future__ import annotations

import argparse
import io
import json
import xml.etree.ElementTree as ET
import zipfile
from collections import defaultdict
from pathlib import Path

import fast_simplification
import numpy as np
import trimesh

ASSETS = Path(__file__).resolve().parents[1] / "src" / "chatvla" / "client" / "sim" / "assets"

PANDA_DIR = "robosuite/models/assets/robots/panda/"
GRIPPER_DIR = "robosuite/models/assets/grippers/"
ARX_DIR = "robosuite_models/assets/robots/arx5/"

# Faces per Panda link (all colours together) and per ARX5 link; picked so a whole scene renders a
# 224x224 frame in a few ms while silhouettes stay recognisable.
PANDA_FACES = 900
PANDA_HAND_FACES = 600
PANDA_FINGER_FACES = 120
ARX_FACES = {"base_link": 400, "link1": 300, "link2": 1000, "link3": 800, "link4": 400, "link5": 500, "link6": 800}
ARX_FINGER_FACES = 200
MIN_GROUP_FACES = 24  # tiny coloured parts (LEDs, logos) stay as they are
MIN_SHELL_FACES = 8
SMALL_SHELL_M = 0.06
MIN_SHELL_EXTENT_M = 0.015  # shells smaller than this (screws, nuts) are a few pixels at 224x224


def _load(zf: zipfile.ZipFile, name: str) -> trimesh.Trimesh:
    ext = name.rsplit(".", 1)[-1].lower()
    mesh = trimesh.load(io.BytesIO(zf.read(name)), file_type=ext, force="mesh", process=False, skip_materials=True)
    return trimesh.Trimesh(mesh.vertices, mesh.faces, process=True)  # merge duplicate vertices


def _simplify(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Quadric decimation, retried more aggressively. A small shell that still will not shrink (pins,
    bearing rings: their open borders and sharp creases resist collapse) becomes its decimated convex
    hull, or its bounding box, which at 224x224 look the same; a large one keeps its best decimation."""
    v = np.asarray(mesh.vertices, np.float64)
    f = np.asarray(mesh.faces, np.int32)
    for agg in (7.0, 9.0, 10.0):
        v, f = fast_simplification.simplify(v, f, target_count=target_faces, agg=agg)
        if len(f) <= 1.15 * target_faces:
            return trimesh.Trimesh(v, f, process=True)
    if len(f) > 1.5 * target_faces and mesh.extents.max() < SMALL_SHELL_M:
        hull = mesh.convex_hull
        hv, hf = fast_simplification.simplify(
            np.asarray(hull.vertices, np.float64),
            np.asarray(hull.faces, np.int32),
            target_count=max(target_faces, 16),
            agg=7.0,
        )
        if len(hf) <= 2 * max(target_faces, 16):
            return trimesh.Trimesh(hv, hf, process=True)
        return mesh.bounding_box_oriented.to_mesh()  # thin pins defeat even the hull: 12 faces
    return trimesh.Trimesh(v, f, process=True)


def _inside(inner: trimesh.Trimesh, outer: trimesh.Trimesh, slack: float = 0.001) -> bool:
    """`inner`'s bounding box lies within `outer`'s and its centre is enclosed by `outer`'s surface."""
    (a0, a1), (b0, b1) = inner.bounds, outer.bounds
    if not (np.all(a0 >= b0 - slack) and np.all(a1 <= b1 + slack)):
        return False
    return bool(outer.is_watertight and outer.contains([inner.bounds.mean(axis=0)])[0])


def _decimate(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Quadric decimation per connected shell. CAD exports are dozens of shells (screws, bearings,
    covers); decimating them as one mesh stalls because each shell keeps a minimum of faces. So drop
    shells too small to cover a pixel at 224x224 and give each remaining shell a share of the budget by
    surface area."""
    if len(mesh.faces) <= max(target_faces, MIN_GROUP_FACES):
        return mesh
    shells = mesh.split(only_watertight=False)
    if len(shells) <= 1:
        return _simplify(mesh, target_faces)
    # Drop slivers (a face or two, no volume), shells too small to see, and shells boxed inside a bigger
    # one (bearings, shafts and screws inside a housing: never visible, but as many faces as the housing).
    shells = [s for s in shells if len(s.faces) >= 4 and s.extents.max() >= MIN_SHELL_EXTENT_M] or shells
    shells = [s for s in shells if not any(o is not s and o.area > s.area and _inside(s, o) for o in shells)]
    area = sum(s.area for s in shells)
    out = [
        s
        if len(s.faces) <= max(MIN_SHELL_FACES, target_faces * s.area / area)
        else _simplify(s, max(MIN_SHELL_FACES, round(target_faces * s.area / area)))
        for s in shells
    ]
    merged = trimesh.util.concatenate(out)
    merged.remove_unreferenced_vertices()
    return merged


def _colour_key(rgba: tuple[float, ...]) -> str:
    r, g, b = rgba[:3]
    if min(r, g, b) >= 0.85:
        return "light"
    if max(r, g, b) <= 0.3:
        return "dark"
    return f"c{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _quat_matrix(quat: str | None) -> np.ndarray:
    m = np.eye(4)
    if quat:
        w, x, y, z = (float(q) for q in quat.split())
        m[:3, :3] = trimesh.transformations.quaternion_matrix([w, x, y, z])[:3, :3]
    return m


def _write(out: Path, name: str, mesh: trimesh.Trimesh) -> int:
    out.mkdir(parents=True, exist_ok=True)
    mesh.export(out / name, file_type="stl")  # binary STL
    return len(mesh.faces)


def _split_budget(groups: dict[str, list[trimesh.Trimesh]], budget: int) -> dict[str, trimesh.Trimesh]:
    merged = {k: trimesh.util.concatenate(v) for k, v in groups.items()}
    merged = {k: trimesh.Trimesh(m.vertices, m.faces, process=True) for k, m in merged.items()}
    total = sum(len(m.faces) for m in merged.values())
    return {k: _decimate(m, max(MIN_GROUP_FACES, round(budget * len(m.faces) / total))) for k, m in merged.items()}


def panda(wheel: Path, out: Path) -> dict:
    zf = zipfile.ZipFile(wheel)
    root = ET.fromstring(zf.read(PANDA_DIR + "robot.xml"))
    materials = {m.get("name"): tuple(float(x) for x in m.get("rgba").split()) for m in root.iter("material")}
    mesh_files = {m.get("name"): m.get("file") for m in root.iter("mesh")}
    manifest: dict[str, list[dict]] = {}
    for body in root.iter("body"):
        groups: dict[str, list[trimesh.Trimesh]] = defaultdict(list)
        colours: dict[str, list[tuple[float, ...]]] = defaultdict(list)
        for geom in body.findall("geom"):
            if geom.get("group") != "1" or geom.get("mesh") is None:
                continue
            rgba = materials[geom.get("material")]
            key = _colour_key(rgba)
            groups[key].append(_load(zf, PANDA_DIR + mesh_files[geom.get("mesh")]))
            colours[key].append(rgba)
        if not groups:
            continue
        name = body.get("name")
        entries = []
        for key, mesh in sorted(_split_budget(groups, PANDA_FACES).items()):
            fname = f"{name}_{key}.stl"
            faces = _write(out, fname, mesh)
            rgba = [round(float(c), 3) for c in np.mean(colours[key], axis=0)]
            entries.append({"file": fname, "rgba": rgba, "faces": faces})
        manifest[name] = entries

    # The gripper: the hand and one finger mesh (the second finger reuses it, rotated, in the scene).
    groot = ET.fromstring(zf.read(GRIPPER_DIR + "panda_gripper.xml"))
    gfiles = {m.get("name"): m.get("file") for m in groot.iter("mesh")}
    for geom_name, body_name, budget, rgba in (
        ("hand_visual", "hand", PANDA_HAND_FACES, [1, 1, 1, 1]),
        ("finger1_visual", "finger", PANDA_FINGER_FACES, [0.499, 0.499, 0.499, 1]),
    ):
        geom = next(g for g in groot.iter("geom") if g.get("name") == geom_name)
        mesh = _load(zf, GRIPPER_DIR + gfiles[geom.get("mesh")])
        mesh.apply_transform(_quat_matrix(geom.get("quat")))
        fname = f"{body_name}.stl"
        faces = _write(out, fname, _decimate(mesh, budget))
        manifest[body_name] = [{"file": fname, "rgba": rgba, "faces": faces}]

    (out / "LICENSE").write_bytes(zf.read("robosuite-1.5.2.dist-info/licenses/LICENSE"))
    return manifest


def _split_arx_fingers(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, trimesh.Trimesh, trimesh.Trimesh]:
    """link6.STL is the flange, gripper housing, rails and both fingers in one static mesh. The sim
    moves the fingers with the commanded width, so cut the finger shells out (they sit beyond
    x=0.06 m, off the centre line), and shift each so its inner face lies at y=0 of its finger body."""
    body, left, right = [], [], []
    for shell in mesh.split(only_watertight=False):
        (x0, y0, _), (_, y1, _) = shell.bounds
        if x0 >= 0.06 and y0 >= 0.025:
            left.append(shell)
        elif x0 >= 0.06 and y1 <= -0.025:
            right.append(shell)
        else:
            body.append(shell)
    left_m, right_m = trimesh.util.concatenate(left), trimesh.util.concatenate(right)
    left_m.apply_translation([0, -left_m.bounds[0][1], 0])
    right_m.apply_translation([0, -right_m.bounds[1][1], 0])
    return trimesh.util.concatenate(body), left_m, right_m


def arx5(wheel: Path, out: Path) -> dict:
    zf = zipfile.ZipFile(wheel)
    manifest: dict[str, list[dict]] = {}
    dark, grey = [0.25, 0.25, 0.27, 1], [0.753, 0.753, 0.753, 1]
    for link, budget in ARX_FACES.items():
        mesh = _load(zf, f"{ARX_DIR}meshes/{link}.STL")
        parts = {link: mesh}
        if link == "link6":
            parts["link6"], parts["finger_left"], parts["finger_right"] = _split_arx_fingers(mesh)
        for name, part in parts.items():
            target = ARX_FINGER_FACES if name.startswith("finger") else budget
            faces = _write(out, f"{name}.stl", _decimate(part, target))
            rgba = dark if name in ("base_link", "link6") or name.startswith("finger") else grey
            manifest[name] = [{"file": f"{name}.stl", "rgba": rgba, "faces": faces}]
    licence = next(n for n in zf.namelist() if n.endswith(".dist-info/LICENSE"))
    (out / "LICENSE").write_bytes(zf.read(licence))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--robosuite", type=Path, required=True, help="robosuite-1.5.2 wheel")
    ap.add_argument("--robosuite-models", type=Path, required=True, help="robosuite_models-1.0.0 wheel")
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args()
    for name, fn, wheel in (("panda", panda, args.robosuite), ("arx5", arx5, args.robosuite_models)):
        out = args.out / name
        for old in out.glob("*.stl"):
            old.unlink()
        manifest = fn(wheel, out)
        (out / "meshes.json").write_text(json.dumps(manifest, indent=1) + "\n")
        total = sum(e["faces"] for es in manifest.values() for e in es)
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"{name}: {sum(len(v) for v in manifest.values())} meshes, {total} faces, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
