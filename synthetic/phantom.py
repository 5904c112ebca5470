"""Procedural CT "digital patient" (chest + upper abdomen) with lesions, deterministic per seed.

The anatomy is a set of implicit shapes in patient LPS millimetres (x → patient left, y → posterior, z → head),
evaluated on any grid, slab by slab, so the same patient can be rendered at 2 mm for fast tests or at 0.7 mm
512×512 for benchmarks. Tissues: air, CT table, skin, subcutaneous fat, muscle wall, paraspinal muscles, spine
(cortex, cancellous bone, discs, canal), ribs + costal cartilage, lungs with branching vessel trees, trachea and
main bronchi, mediastinal fat, heart (myocardium + contrast blood pool), aorta, IVC, esophagus, diaphragm domes,
liver with portal vessels, spleen, stomach with air–fluid level, kidneys (cortex/medulla/sinus fat), bowel/mesentery.
Portal-venous-phase HU values, smooth per-organ texture, partial-volume blur and correlated noise (sd 10–25 HU).

Lesions (integer labels 1..n, each with kind, organ and centre): solid lobulated, part-solid and spiculated lung
nodules, hypodense liver lesions 20–60 HU below liver, enlarged lymph nodes in fat, and a juxtapleural nodule that
touches the chest wall (similar density).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from lesiontrack.models.imaging.volume import Volume

Array = np.ndarray

# organ label ids of the phantom's organ map
ORGANS = {
    "air": 0,
    "body_wall": 1,
    "fat": 2,
    "muscle": 3,
    "bone": 4,
    "lung": 5,
    "lung_vessel": 6,
    "airway": 7,
    "mediastinum": 8,
    "heart": 9,
    "aorta": 10,
    "ivc": 11,
    "esophagus": 12,
    "liver": 13,
    "spleen": 14,
    "stomach": 15,
    "kidney": 16,
    "bowel": 17,
    "table": 18,
    "spinal_canal": 19,
}

HU = {
    "air": -1000.0,
    "lung": -860.0,
    "fat": -100.0,
    "muscle": 50.0,
    "skin": 30.0,
    "blood": 160.0,
    "myocardium": 70.0,
    "liver": 105.0,
    "spleen": 115.0,
    "kidney_cortex": 170.0,
    "kidney_medulla": 110.0,
    "cortical_bone": 800.0,
    "cancellous_bone": 230.0,
    "disc": 85.0,
    "csf": 15.0,
    "cartilage": 120.0,
    "bowel": 35.0,
    "fluid": 12.0,
    "lung_vessel": 90.0,
    "table": 250.0,
}


@dataclass
class LesionInfo:
    """One phantom lesion: its label in the lesion map, what it is, where (LPS mm) and how big."""

    label: int
    kind: str
    organ: str
    center_mm: list[float]
    radius_mm: float
    hu: float
    volume_mm3: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Phantom:
    ct: Volume  # int16 HU
    lesions: Volume  # uint16 lesion labels (0 = background)
    organs: Volume  # uint8 organ ids (see ORGANS)
    lesion_info: list[LesionInfo]
    seed: int


# -- smooth random fields -----------------------------------------------------------------------------
class _SmoothField:
    """Sum of random plane waves: a smooth, seed-determined scalar field (zero mean, unit-ish sd) anywhere."""

    def __init__(self, rng: np.random.Generator, wavelength_mm: float, n: int = 12) -> None:
        k = rng.normal(size=(n, 3))
        k /= np.linalg.norm(k, axis=1, keepdims=True)
        self.k = k * (2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.4, (n, 1))))
        self.phase = rng.uniform(0, 2 * np.pi, n)
        self.scale = np.sqrt(2.0 / n)

    def __call__(self, x: Array, y: Array, z: Array) -> Array:
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), np.float32)
        for (kx, ky, kz), ph in zip(self.k, self.phase, strict=True):
            out += np.cos(kx * x + ky * y + kz * z + ph).astype(np.float32)
        return out * np.float32(self.scale)

    def grid(self, xs: Array, ys: Array, zs: Array) -> Array:
        """The same field on the grid ``xs × ys × zs`` (1-D axes) → ``(nz, ny, nx)``, via cos(a+b) expansion."""
        out = np.zeros((len(zs), len(ys), len(xs)), np.float32)
        xs, ys, zs = (np.asarray(v, np.float64) for v in (xs, ys, zs))
        for (kx, ky, kz), ph in zip(self.k, self.phase, strict=True):
            a = kx * xs
            b = (ky * ys)[None, :] + (kz * zs + ph)[:, None]  # (nz, ny)
            out += np.cos(b).astype(np.float32)[:, :, None] * np.cos(a).astype(np.float32)[None, None, :]
            out -= np.sin(b).astype(np.float32)[:, :, None] * np.sin(a).astype(np.float32)[None, None, :]
        return out * np.float32(self.scale)


def _capsule_dist(px: Array, py: Array, pz: Array, a: Array, b: Array) -> Array:
    """Distance from points to segment a–b."""
    ab = b - a
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / max(float(ab @ ab), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((px - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (pz - a[2] - t * ab[2]) ** 2)


def _cross(a: Array, b: Array) -> Array:
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _rot_z(deg: float) -> Array:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _ellipsoid(x: Array, y: Array, z: Array, c: Array, semi: Array, rot: Array | None = None) -> Array:
    """Normalised ellipsoid radius (<1 inside)."""
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    if rot is not None:  # coordinates in the ellipsoid frame: rotᵀ·d
        dx, dy, dz = (
            rot[0, 0] * dx + rot[1, 0] * dy + rot[2, 0] * dz,
            rot[0, 1] * dx + rot[1, 1] * dy + rot[2, 1] * dz,
            rot[0, 2] * dx + rot[1, 2] * dy + rot[2, 2] * dz,
        )
    return np.sqrt((dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2)


# -- anatomy ----------------------------------------------------------------------------------------------
class _Regions(NamedTuple):
    """Regions of the body the organs are placed in (set by :meth:`_Anatomy._paint_wall`)."""

    body: Array
    muscle: Array
    crho: Array  # cavity radius (< 1 inside the body cavity)
    zd: Array  # diaphragm height
    thorax: Array
    cav: Array


@dataclass
class _Slab:
    """Query points (model units) with the HU and organ maps being painted and the smooth fields there. With
    ``axes`` (the 1-D grid axes of an axial slab) shapes are rasterised only inside their bounding boxes."""

    x: Array
    y: Array
    z: Array
    shape: tuple[int, ...]
    axes: tuple[Array, Array, Array] | None
    ax1: list[Array]
    inv: np.float32
    hu: Array
    org: Array
    tex: Array
    fine: Array
    bowel: Array
    gas: Array

    def paint(self, mask: Array, value: Array | float | np.float32, organ: str) -> None:
        self.hu[mask] = value[mask] if isinstance(value, np.ndarray) else value
        self.org[mask] = ORGANS[organ]

    def _sub(self, lo: Array, hi: Array) -> tuple[slice, slice, slice] | None:
        if self.axes is None:
            raise ValueError("sub-box lookup needs the grid axes")
        ax1 = self.ax1
        out_sl = []
        for a1, a, b in ((ax1[2], lo[2], hi[2]), (ax1[1], lo[1], hi[1]), (ax1[0], lo[0], hi[0])):
            i0, i1 = int(np.searchsorted(a1, a)), int(np.searchsorted(a1, b, side="right"))
            if i1 <= i0:
                return None
            out_sl.append(slice(i0, i1))
        return (out_sl[0], out_sl[1], out_sl[2])

    def ell(self, c: Array, semi: Array, rot: Array | None = None) -> Array:
        """_ellipsoid, evaluated only inside its bounding box on slab grids (9 outside)."""
        if self.axes is None:
            return _ellipsoid(self.x, self.y, self.z, c, semi, rot)
        ax1 = self.ax1
        r = float(np.max(semi)) * 1.3 + 1.0
        out = np.full(self.shape, 9.0, np.float32)
        b = self._sub(np.asarray(c) - r, np.asarray(c) + r)
        if b is not None:
            out[b] = _ellipsoid(
                ax1[0][b[2]][None, None, :], ax1[1][b[1]][None, :, None], ax1[2][b[0]][:, None, None], c, semi, rot
            )
        return out

    def cap(self, a: Array, b_: Array, reach: float = 20.0) -> Array:
        """_capsule_dist within ``reach`` mm of the segment's box on slab grids (1e4 outside)."""
        if self.axes is None:
            return _capsule_dist(self.x, self.y, self.z, a, b_)
        ax1 = self.ax1
        out = np.full(self.shape, 1e4, np.float32)
        b = self._sub(np.minimum(a, b_) - reach, np.maximum(a, b_) + reach)
        if b is not None:
            out[b] = _capsule_dist(
                ax1[0][b[2]][None, None, :], ax1[1][b[1]][None, :, None], ax1[2][b[0]][:, None, None], a, b_
            )
        return out


class _Anatomy:
    """Seeded anatomical parameters and the implicit tissue model evaluated on coordinate arrays.

    Shapes are defined in a canonical adult frame; ``scale`` (0.8–0.92) maps it to this patient's size.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        self.scale = u(0.8, 0.92)
        self.s = 1.0
        self.a, self.b = 158.0 * u(0.95, 1.05), 112.0 * u(0.95, 1.04)
        self.fat = u(8.0, 22.0)  # subcutaneous fat (mm, at the AP axis)
        self.wall = u(9.0, 13.0)  # muscle wall thickness
        self.z_dome_r, self.z_dome_l = u(25, 40), u(10, 25)
        self.spine_y = 58.0
        self.heart_c = np.array([u(14, 24), -28.0, self.z_dome_l + u(30, 38)])
        self.heart_rot = _rot_z(u(25, 40))
        self.aorta_c = np.array([22.0, self.spine_y - 26.0])
        self.ivc_c = np.array([-24.0, self.spine_y - 30.0])
        self.eso_c = np.array([4.0, self.spine_y - 30.0])
        self.liver_c = np.array([-50.0 + u(-6, 6), -8.0, self.z_dome_r - u(55, 70)])
        self.spleen_c = np.array([95.0, 42.0, self.z_dome_l - u(40, 50)])
        self.stomach_c = np.array([50.0, -35.0, self.z_dome_l - u(35, 45)])
        self.kidney_l = np.array([70.0, self.spine_y - 2.0, u(-95, -80)])
        self.kidney_r = np.array([-70.0, self.spine_y - 2.0, u(-105, -90)])
        self.texture = _SmoothField(rng, 40.0)
        self.fine = _SmoothField(rng, 12.0, n=16)
        self.bowel = _SmoothField(rng, 45.0, n=16)
        self.gas = self.fine  # where bowel loops hold gas (changes between scans with ``bowel_state``)
        self.bowel_offset = np.zeros(3)  # mm, canonical frame: where the loops moved between scans
        self.outline = _SmoothField(rng, 160.0, n=6)
        self.rib_phase = u(0, 26)
        self.vessels = self._vessel_trees(rng)
        self.airways = self._airways()

    # geometry helpers (canonical frame)
    def body_rho(self, x: Array, y: Array, z: Array) -> Array:
        a = self.a * (1 + 0.03 * self.outline(x, y, z * 0))
        b = self.b * (1 + 0.02 * self.outline(y, x, z * 0))
        return (np.abs(x / a) ** 2.4 + np.abs(y / b) ** 2.4) ** (1 / 2.4)

    def cavity_rho(self, x: Array, y: Array, z: Array) -> Array:
        a_c = self.a - self.fat * 1.2 - self.wall - 3
        yc = -5.0
        b_c = self.b - self.fat - self.wall - 3 + yc * np.sign(-1)
        b_c = np.where(y - yc < 0, self.b - self.fat - self.wall - 3 + yc, self.b - self.fat * 0.7 - self.wall - 8 - yc)
        rho = (np.abs(x / a_c) ** 2.3 + np.abs((y - yc) / b_c) ** 2.3) ** (1 / 2.3)
        # spine and paraspinal muscles push in from behind: a rounded region around the midline
        ell = np.hypot(x / 40.0, (y - self.spine_y - 24) / 32.0)
        return np.maximum(rho, 2.0 - ell)

    def diaphragm(self, x: Array, y: Array) -> Array:
        zr = self.z_dome_r - 0.0050 * (x + 60) ** 2 - 0.0030 * (y + 5) ** 2
        zl = self.z_dome_l - 0.0050 * (x - 60) ** 2 - 0.0030 * (y + 5) ** 2
        return np.maximum(zr, zl)

    def _vessel_trees(self, rng: np.random.Generator) -> list[tuple[Array, Array, float]]:
        segs: list[tuple[Array, Array, float]] = []
        for side in (-1, 1):
            hilum = np.array([side * 55.0, 5.0, self.z_dome_r + 40])
            for start_dir in (
                [side, -0.7, 0.8],
                [side, 0.4, 1.0],
                [side, 0.6, -0.7],
                [side, -0.8, -0.6],
                [side * 0.7, 1.0, -0.3],
                [side, 0.0, 0.1],
                [side * 0.5, -1.0, 0.2],
                [side * 0.6, 0.8, 0.6],
                [side * 0.4, 0.2, -1.0],
            ):
                d = np.array(start_dir, float)
                self._grow(rng, hilum + rng.normal(0, 4, 3), d / np.linalg.norm(d), 34.0, 4.5, 0, segs)
            # peripheral vessel fragments radiating from the hilum (only their parts inside the lung are drawn)
            for _ in range(900):
                p = hilum + np.array([side * abs(rng.normal(60, 35)), rng.normal(0, 45), rng.normal(-10, 45)])
                d = p - hilum
                dist = float(np.linalg.norm(d))
                r = float(np.clip(3.2 - dist / 40.0 + rng.normal(0, 0.3), 0.4, 2.5))
                segs.append((p, p + d / dist * rng.uniform(8, 18), r))
        return segs

    def _grow(
        self,
        rng: np.random.Generator,
        p: Array,
        d: Array,
        length: float,
        radius: float,
        depth: int,
        segs: list[tuple[Array, Array, float]],
    ) -> None:
        if radius < 0.4 or depth > 8:
            return
        end = p + d * length
        segs.append((p, end, radius))
        for sign in (-1, 1):
            axis = _cross(d, rng.normal(size=3))
            axis /= np.linalg.norm(axis) + 1e-9
            ang = np.deg2rad(rng.uniform(15, 35)) * sign
            nd = d * np.cos(ang) + _cross(axis, d) * np.sin(ang) + axis * (axis @ d) * (1 - np.cos(ang))
            self._grow(
                rng,
                end,
                nd / np.linalg.norm(nd),
                length * rng.uniform(0.72, 0.85),
                radius * rng.uniform(0.68, 0.78),
                depth + 1,
                segs,
            )

    def _airways(self) -> list[tuple[Array, Array, float]]:
        carina = np.array([0.0, 5.0, self.z_dome_r + 62])
        top = np.array([0.0, -15.0, 400.0])
        out = [(top, carina, 9.0)]
        for side in (-1, 1):
            hil = np.array([side * 45.0, 10.0, self.z_dome_r + 45])
            out.append((carina, hil, 6.0))
            for dz, dy in ((28.0, 0.0), (-30.0, 12.0), (-10.0, -20.0)):
                out.append((hil, hil + np.array([side * 22.0, dy, dz]), 3.2))
        return out

    def evaluate(
        self, x: Array, y: Array, z: Array, axes: tuple[Array, Array, Array] | None = None, voxel_mm: float = 1.0
    ) -> tuple[Array, Array]:
        """HU (float32) and organ id (uint8) at LPS points given as broadcastable coordinate arrays.

        ``axes`` = the 1-D (xs, ys, zs) of an axial grid slab (then x, y, z are their broadcasts): enables the
        lung vessel trees and airways, which are rasterised by bounding box. Point queries leave them out.
        """
        g = self._slab(x, y, z, axes)
        r = self._paint_wall(g)
        self._paint_ribs(g, r)
        abd = self._paint_cavity(g, r)
        lung, ivc = self._paint_mediastinum(g, r)
        liver = self._paint_liver(g, r, abd, ivc)
        self._paint_abdominal_organs(g, r, abd, liver)
        self._paint_spine(g, r)
        # lung vessels and airways (inside lungs / mediastinum)
        if axes is not None:
            sx, sy, sz = (np.asarray(a, np.float32) * g.inv for a in axes)
            self._tubes((sx, sy, sz), lung, g.hu, g.org, ~r.thorax, voxel_mm * float(g.inv))
        return g.hu, g.org

    def _slab(self, x: Array, y: Array, z: Array, axes: tuple[Array, Array, Array] | None) -> _Slab:
        """The query points (in model units) with empty HU / organ maps and the smooth fields evaluated on them."""
        inv = np.float32(1.0 / self.scale)
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        x, y, z = (np.broadcast_to(np.asarray(v, np.float32) * inv, shape) for v in (x, y, z))
        hu = np.full(shape, HU["air"], np.float32)
        org = np.zeros(shape, np.uint8)
        ax1: list[Array] = []
        if axes is not None:  # separable evaluation of the smooth fields on the slab grid
            ax1 = [np.asarray(a, np.float64) * float(inv) for a in axes]
            tex, fine = (f.grid(*ax1) for f in (self.texture, self.fine))
            moved = [a - o for a, o in zip(ax1, self.bowel_offset, strict=True)]
            bowel, gas = self.bowel.grid(*moved), self.gas.grid(*moved)
        else:
            tex, fine = self.texture(x, y, z), self.fine(x, y, z)
            o = self.bowel_offset.astype(np.float32)
            bowel, gas = self.bowel(x - o[0], y - o[1], z - o[2]), self.gas(x - o[0], y - o[1], z - o[2])
        return _Slab(x, y, z, shape, axes, ax1, inv, hu, org, tex, fine, bowel, gas)

    def _paint_wall(self, g: _Slab) -> _Regions:
        """The table, skin, fat and muscle of the body wall; the regions the organs are placed in."""
        # table under the patient (posterior)
        ty = self.b + 14.0
        tcurve = ty + 0.0008 * g.x**2
        g.paint(
            (g.y > tcurve) & (g.y < tcurve + 6) & (np.abs(g.x) < 230), np.float32(HU["table"]) + 30 * g.tex, "table"
        )
        g.paint((g.y >= tcurve + 6) & (g.y < tcurve + 28) & (np.abs(g.x) < 220), np.float32(-880.0), "table")
        g.paint((g.y >= tcurve + 28) & (g.y < tcurve + 33) & (np.abs(g.x) < 220), np.float32(HU["table"]), "table")

        rho = self.body_rho(g.x, g.y, g.z)
        body = rho < 1.0
        g.paint(body, np.float32(HU["skin"]) + 5 * g.tex, "body_wall")
        g.paint(rho < 1.0 - 2.5 / self.b, HU["fat"] + 8 * g.tex, "fat")
        wall_edge = 1.0 - (self.fat + 2.5) / self.b
        muscle = rho < wall_edge
        g.paint(muscle, HU["muscle"] + 6 * g.tex, "muscle")
        # intermuscular fat plane
        g.paint(muscle & (np.abs(rho - (wall_edge - 0.045)) < 0.008), np.float32(HU["fat"]), "fat")
        crho = self.cavity_rho(g.x, g.y, g.z)
        zd = self.diaphragm(g.x, g.y)
        thorax = g.z > zd
        cav = crho < 1.0
        return _Regions(body, muscle, crho, zd, thorax, cav)

    def _paint_ribs(self, g: _Slab, r: _Regions) -> None:
        # ribs: oblique arcs in the wall ring (posterior high → anterior low), cartilage anteriorly
        ring = r.muscle & (r.crho >= 0.99) & (r.crho < 1.12)
        ang = np.degrees(np.arctan2(g.y, np.abs(g.x)))  # -90 anterior .. +90 posterior
        rib_z = g.z + 0.6 * (90 - ang) + self.rib_phase
        rib_d = np.abs(np.mod(rib_z, 27.0) - 13.5) / 0.6 * 0.55  # distance to the rib mid-line along z (mm)
        rib_r = np.abs(r.crho - 1.04) * 110.0  # ~ radial distance (mm)
        rib_e = (rib_d / 5.5) ** 2 + (rib_r / 3.5) ** 2
        rib = ring & (rib_e < 1.0) & (g.z > r.zd - 45) & (np.abs(g.x) > 20)
        cart = rib & (ang < -60)
        g.paint(rib & ~cart, np.float32(HU["cortical_bone"]) + 60 * g.tex, "bone")
        g.paint(rib & ~cart & (rib_e < 0.35), np.float32(HU["cancellous_bone"] + 80), "bone")
        g.paint(cart, np.float32(HU["cartilage"]), "bone")
        # sternum
        g.paint(
            r.muscle & (np.abs(g.x) < 16) & (r.crho >= 1.0) & (r.crho < 1.10) & (g.y < 0) & (g.z > r.zd - 20),
            np.float32(HU["cancellous_bone"] + 100),
            "bone",
        )

    def _paint_cavity(self, g: _Slab, r: _Regions) -> Array:
        """Abdominal fat with bowel loops, mediastinal fat; returns the abdominal cavity."""
        # cavity content: abdomen (fat + bowel loops), thorax (mediastinal fat, lungs)
        abd = r.cav & ~r.thorax
        g.paint(abd, np.float32(HU["fat"]) + 10 * g.tex, "fat")
        bw = g.bowel
        loops = abd & (np.abs(bw) < 0.35)
        g.paint(loops, HU["bowel"] + 12 * g.fine, "bowel")
        g.paint(loops & (np.abs(bw) < 0.12) & (g.gas > 0.8), np.float32(-950.0), "bowel")
        g.paint(r.cav & r.thorax, np.float32(-85.0) + 10 * g.tex, "mediastinum")
        return abd

    def _paint_mediastinum(self, g: _Slab, r: _Regions) -> tuple[Array, Array]:
        """Lungs, heart, great vessels, esophagus and IVC; returns the lungs and the IVC."""
        hr = g.ell(self.heart_c, np.array([56, 44, 46]), self.heart_rot)
        asc = g.cap(self.heart_c + np.array([-14, -2, 25]), np.array([-8.0, -20, 140]))
        arch = g.cap(np.array([-8.0, -20, 140]), np.array([self.aorta_c[0], self.aorta_c[1], 150]))
        pa = g.cap(self.heart_c + np.array([6, -14, 30]), np.array([0.0, 0, self.z_dome_r + 55]))
        dao = np.hypot(g.x - self.aorta_c[0], g.y - self.aorta_c[1])
        deso = np.hypot(g.x - self.eso_c[0], g.y - self.eso_c[1])
        central = np.abs(g.x - 2) < 5 + 17 * np.clip((g.y + 60) / 70, 0, 1)
        medi = central | (hr < 1.12) | (asc < 19) | (dao < 18) | (deso < 12) | (pa < 17) | (arch < 18)
        lung = r.cav & r.thorax & (r.crho < 0.99) & ~medi & (g.z > r.zd + 2)
        g.paint(lung, HU["lung"] + 25 * g.tex + 12 * g.fine + 30 * np.clip((g.y - 0) / 80, 0, 1), "lung")

        # heart with pericardial fat, myocardium and contrast blood pool
        g.paint((hr < 1.0) & r.cav & r.thorax, HU["myocardium"] + 5 * g.tex, "heart")
        g.paint((hr < 0.8) & r.cav & r.thorax, HU["blood"] + 6 * g.tex, "heart")
        lv = g.ell(self.heart_c + self.heart_rot @ np.array([18.0, 6, -6]), np.array([26, 20, 26]), self.heart_rot)
        g.paint((lv < 1.0) & (hr < 0.95) & r.cav & r.thorax, np.float32(HU["myocardium"]), "heart")
        g.paint((lv < 0.62) & r.cav & r.thorax, np.float32(HU["blood"] + 20), "heart")

        # great vessels, esophagus
        g.paint(((asc < 15) | (arch < 13)) & r.thorax & r.cav, np.float32(HU["blood"] + 30), "aorta")
        g.paint((pa < 13) & r.thorax & r.cav & (hr > 0.85), np.float32(HU["blood"] - 10), "aorta")
        g.paint((dao < 12.0) & r.muscle & (r.crho < 1.3), np.float32(HU["blood"] + 30) + 4 * g.tex, "aorta")
        g.paint((deso < 7) & r.thorax & r.cav, np.where(deso < 2, -900.0, 40.0).astype(np.float32), "esophagus")
        ivc = (np.hypot(g.x - self.ivc_c[0], g.y - self.ivc_c[1]) < 11) & (g.z < r.zd + 18) & r.muscle & (r.crho < 1.3)
        g.paint(ivc, np.float32(HU["blood"] - 30), "ivc")
        return lung, ivc

    def _paint_liver(self, g: _Slab, r: _Regions, abd: Array, ivc: Array) -> Array:
        # liver: right lobe + left lobe, under the diaphragm, with portal/hepatic vessels
        below = r.zd - g.z
        lr = g.ell(self.liver_c, np.array([92, 85, 72]), _rot_z(-15))
        ll = g.ell(np.array([15.0, -48, self.z_dome_l - 30]), np.array([55, 28, 32]), _rot_z(-10))
        hug = r.crho > 1.0 - np.clip(1.2 - below / 110.0, 0.4, 1.2)  # lower liver: a crescent along the wall
        liver = abd & (below > 3) & (((lr < 1.0) & hug) | (ll < 1.0)) & ~ivc
        g.paint(liver, HU["liver"] + 6 * g.tex + 3 * g.fine, "liver")
        zc = self.liver_c[2]
        pv = g.cap(np.array([-5.0, 15, zc - 15]), np.array([-85.0, -15, zc + 25]))
        pv2 = g.cap(np.array([-45.0, 0, zc + 5]), np.array([-60.0, 40, zc + 45]))
        pv3 = g.cap(np.array([-45.0, 0, zc + 5]), np.array([-20.0, -50, zc + 30]))
        g.paint(liver & ((pv < 5.5) | (pv2 < 3.5) | (pv3 < 3.0)), np.float32(HU["blood"] + 5), "liver")
        return liver

    def _paint_abdominal_organs(self, g: _Slab, r: _Regions, abd: Array, liver: Array) -> None:
        # spleen, stomach (air–fluid level), kidneys
        sr = g.ell(self.spleen_c, np.array([22, 50, 50]), _rot_z(40))
        g.paint((sr < 1) & abd, HU["spleen"] + 5 * g.tex, "spleen")
        st = g.ell(self.stomach_c, np.array([38, 32, 42]), _rot_z(-25))
        stomach = (st < 1) & abd & ~liver
        g.paint(stomach, np.float32(HU["muscle"]), "stomach")
        inner = (st < 0.86) & stomach
        g.paint(
            inner,
            np.where(g.y < self.stomach_c[1] - 4, HU["air"], HU["fluid"] + 5 * g.fine).astype(np.float32),
            "stomach",
        )
        for kc, rot in ((self.kidney_l, _rot_z(-30)), (self.kidney_r, _rot_z(30))):
            kr = g.ell(kc, np.array([26, 20, 50]), rot)
            kidney = (kr < 1) & (r.crho < 1.25) & ~r.thorax & r.body
            g.paint(kidney & (kr < 1.25) & ~(kr < 1), np.float32(HU["fat"]), "fat")
            g.paint(kidney, np.float32(HU["kidney_cortex"]) + 5 * g.tex, "kidney")
            g.paint(kidney & (kr < 0.72) & (g.fine > -0.5), np.float32(HU["kidney_medulla"]), "kidney")
            hil = g.ell(kc + np.array([-np.sign(kc[0]) * 14, -6, 0]), np.array([10, 8, 22]))
            g.paint(kidney & (hil < 1), np.float32(-60.0), "kidney")

    def _paint_spine(self, g: _Slab, r: _Regions) -> None:
        # spine: vertebral bodies with discs, canal, posterior arch, transverse processes
        vb = np.hypot(g.x, (g.y - self.spine_y) * 1.15)
        disc = np.abs(np.mod(g.z + 7.0, 30.0) - 3.0) < 3.0
        g.paint((vb < 17) & r.body, np.float32(HU["cortical_bone"]), "bone")
        g.paint(
            (vb < 14.5) & r.body,
            np.where(disc, HU["disc"], HU["cancellous_bone"] + 40 * g.tex).astype(np.float32),
            "bone",
        )
        canal = np.hypot(g.x, g.y - self.spine_y - 27)
        arch = ((canal < 13) & (g.y > self.spine_y + 12)) | (
            (np.abs(g.x) < 4) & (g.y > self.spine_y + 27) & (g.y < self.spine_y + 52)
        )
        arch |= (
            (np.abs(np.abs(g.x) - 26) < 11) & (np.abs(g.y - self.spine_y - 22 + 0.3 * (np.abs(g.x) - 26)) < 3.5) & ~disc
        )
        g.paint(arch & r.body & r.muscle, np.float32(HU["cortical_bone"] * 0.75) + 40 * g.tex, "bone")
        g.paint((canal < 8) & r.body, np.float32(HU["csf"] + 10), "spinal_canal")

    def _tubes(
        self, axes: tuple[Array, Array, Array], lung: Array, hu: Array, org: Array, abdomen: Array, voxel: float
    ) -> None:
        xs, ys, zs = axes

        def box(p0: Array, p1: Array, pad: float) -> tuple[slice, slice, slice] | None:
            lo, hi = np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad
            sl = []
            for ax, a, b in ((zs, lo[2], hi[2]), (ys, lo[1], hi[1]), (xs, lo[0], hi[0])):
                i0, i1 = np.searchsorted(ax, a), np.searchsorted(ax, b, side="right")
                if i1 <= i0:
                    return None
                sl.append(slice(int(i0), int(i1)))
            return (sl[0], sl[1], sl[2])

        r_min = 0.55 * voxel  # thinner vessels are drawn at this radius with proportionally lower contrast
        if not hasattr(self, "_vz"):
            self._vz = np.array([(min(p0[2], p1[2]) - r - 2, max(p0[2], p1[2]) + r + 2) for p0, p1, r in self.vessels])
        near = np.nonzero((self._vz[:, 1] >= zs[0]) & (self._vz[:, 0] <= zs[-1]))[0]
        for n in near:
            p0, p1, r = self.vessels[n]
            rr = max(r, r_min)
            b = box(p0, p1, rr + 1)
            if b is None:
                continue
            d = _capsule_dist(xs[b[2]][None, None, :], ys[b[1]][None, :, None], zs[b[0]][:, None, None], p0, p1)
            inside = (d < rr) & (lung[b] | (org[b] == ORGANS["lung_vessel"]))
            frac = min(1.0, (r / rr) ** 2)
            sub = hu[b]
            sub[inside] = np.maximum(sub[inside], HU["lung"] + frac * (HU["lung_vessel"] - HU["lung"]))
            hu[b] = sub
            o = org[b]
            o[inside] = ORGANS["lung_vessel"]
            org[b] = o
        for p0, p1, r in self.airways:
            b = box(p0, p1, r + 3)
            if b is None:
                continue
            d = _capsule_dist(xs[b[2]][None, None, :], ys[b[1]][None, :, None], zs[b[0]][:, None, None], p0, p1)
            keep = ~abdomen[b]
            sub, o = hu[b], org[b]
            wall = (d < r + 1.6) & keep
            sub[wall] = 40.0
            o[wall] = ORGANS["airway"]
            sub[(d < r) & keep] = HU["air"]
            hu[b], org[b] = sub, o


# -- lesions ----------------------------------------------------------------------------------------------
def _lesion_field(info: LesionInfo, x: Array, y: Array, z: Array) -> Array:
    """Signed-ish shape function: < 0 inside the lesion."""
    c = np.array(info.center_mm)
    p = info.params
    if info.kind in ("solid lung nodule", "juxtapleural lung nodule", "enlarged lymph node", "liver lesion"):
        semi = np.array(p.get("semi", [info.radius_mm] * 3))
        f = _ellipsoid(x, y, z, c, semi, np.array(p["rot"]) if "rot" in p else None) - 1.0
        for lc, lr in p.get("lobes", []):
            f = np.minimum(f, np.sqrt((x - lc[0]) ** 2 + (y - lc[1]) ** 2 + (z - lc[2]) ** 2) / lr - 1.0)
        return f
    if info.kind == "part-solid lung nodule":
        return np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / info.radius_mm - 1.0
    if info.kind == "spiculated lung nodule":
        f = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / info.radius_mm - 1.0
        for tip in p["spicules"]:
            d = _capsule_dist(x, y, z, c, np.array(tip))
            f = np.minimum(f, d / 1.1 - 1.0)
        return f
    raise ValueError(f"unknown lesion kind {info.kind}")


def _lesion_hu(info: LesionInfo, x: Array, y: Array, z: Array, base_hu: Array) -> Array:
    if info.kind == "part-solid lung nodule":
        c = np.array(info.center_mm)
        r = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        return np.where(r < info.params["core_mm"], info.hu, info.params["ggo_hu"]).astype(np.float32)
    return np.full(x.shape, info.hu, np.float32)


def _place_lesions(
    anat: _Anatomy, rng: np.random.Generator, n: int, zlim: tuple[float, float], xylim: tuple[Array, Array]
) -> list[LesionInfo]:
    kinds = [
        "solid lung nodule",
        "liver lesion",
        "enlarged lymph node",
        "part-solid lung nodule",
        "spiculated lung nodule",
        "juxtapleural lung nodule",
        "liver lesion",
        "solid lung nodule",
    ]
    want = (kinds * (n // len(kinds) + 1))[:n]
    out: list[LesionInfo] = []
    for kind in want:
        r = {
            "liver lesion": rng.uniform(7, 15),
            "enlarged lymph node": rng.uniform(7, 11),
            "part-solid lung nodule": rng.uniform(7, 11),
            "juxtapleural lung nodule": rng.uniform(5, 8),
        }.get(kind, rng.uniform(4.5, 9))
        info = None
        for _ in range(4000):
            c = np.array(
                [
                    rng.uniform(xylim[0][0] + 20, xylim[1][0] - 20),
                    rng.uniform(xylim[0][1] + 20, xylim[1][1] - 20),
                    rng.uniform(zlim[0] + r + 4, zlim[1] - r - 4),
                ]
            )
            if any(np.linalg.norm(c - np.array(o.center_mm)) < r + o.radius_mm + 8 for o in out):
                continue
            info = _lesion_at(anat, kind, c, r, rng)
            if info is not None:
                break
        if info is None:
            continue  # the field of view has no room for this kind (e.g. no liver in a thorax-only FOV)
        info.label = len(out) + 1
        out.append(info)
    return out


def _lesion_at(anat: _Anatomy, kind: str, c: Array, r: float, rng: np.random.Generator) -> LesionInfo | None:
    """A lesion of ``kind`` (radius ``r``) centred at ``c`` when the anatomy there suits it, else None."""
    info = None
    pts = np.vstack([c[None], c + r * _sphere_points()])
    _, org_p = anat.evaluate(pts[:, 0], pts[:, 1], pts[:, 2])
    oc, os_ = int(org_p[0]), org_p[1:]
    if kind == "liver lesion" and oc == ORGANS["liver"] and np.all(os_ == ORGANS["liver"]):
        delta = rng.uniform(20, 60)
        info = LesionInfo(
            0,
            kind,
            "liver",
            c.tolist(),
            r,
            HU["liver"] - delta,
            params={"semi": (r * rng.uniform(0.8, 1.2, 3)).tolist(), "contrast_hu": -delta},
        )
    elif kind == "enlarged lymph node":
        in_fat = np.isin(os_, [ORGANS["mediastinum"], ORGANS["fat"]])
        if (
            oc in (ORGANS["mediastinum"], ORGANS["fat"])
            and in_fat.mean() > 0.85
            and anat.cavity_rho(*(c[:, None] / anat.scale))[0] < 0.95
        ):
            semi = [r * 1.4, r, r * 1.1]
            info = LesionInfo(
                0,
                kind,
                "mediastinal/abdominal fat",
                c.tolist(),
                r,
                45.0,
                params={"semi": semi, "rot": _rot_z(rng.uniform(0, 180)).tolist()},
            )
    elif kind == "juxtapleural lung nodule":
        if oc == ORGANS["lung"]:
            wall = np.isin(os_, [ORGANS["muscle"], ORGANS["bone"], ORGANS["fat"], ORGANS["body_wall"]])
            lungf = os_ == ORGANS["lung"]
            if 0.1 < wall.mean() < 0.4 and lungf.mean() > 0.5:
                info = LesionInfo(
                    0,
                    kind,
                    "lung (touching chest wall)",
                    c.tolist(),
                    r,
                    45.0,
                    params={"semi": [r, r * 0.8, r * 1.1]},
                )
    elif oc == ORGANS["lung"] and np.all(np.isin(os_, [ORGANS["lung"], ORGANS["lung_vessel"]])):
        return _lung_nodule(kind, c, r, rng)
    return info


def _lung_nodule(kind: str, c: Array, r: float, rng: np.random.Generator) -> LesionInfo | None:
    """A lung nodule of ``kind`` at ``c`` (a site inside the lung parenchyma)."""
    if kind == "solid lung nodule":
        lobes = [
            ((c + rng.normal(0, r * 0.45, 3)).tolist(), r * rng.uniform(0.45, 0.7)) for _ in range(rng.integers(2, 5))
        ]
        return LesionInfo(
            0,
            kind,
            "lung",
            c.tolist(),
            r,
            rng.uniform(20, 45),
            params={"semi": [r * 0.9, r * 0.85, r], "lobes": lobes},
        )
    if kind == "part-solid lung nodule":
        return LesionInfo(
            0,
            kind,
            "lung",
            c.tolist(),
            r,
            25.0,
            params={"core_mm": r * rng.uniform(0.35, 0.5), "ggo_hu": rng.uniform(-620, -480)},
        )
    if kind == "spiculated lung nodule":
        dirs = rng.normal(size=(int(rng.integers(8, 14)), 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        tips = [(c + d_ * r * rng.uniform(1.5, 2.3)).tolist() for d_ in dirs]
        return LesionInfo(0, kind, "lung", c.tolist(), r, 35.0, params={"spicules": tips})
    return None


def _sphere_points(n: int = 40) -> Array:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    th = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], axis=1)


# -- public API -----------------------------------------------------------------------------------------
def _move_bowel(anat: _Anatomy, rng: np.random.Generator) -> None:
    """Peristalsis between two scans: the loops shift (≈ 8 mm sd) and deform (each wave of the loop field moves by
    ≈ 0.8 rad sd of its phase, i.e. several mm), and the gas sits elsewhere (a new gas pattern)."""
    bowel = copy.deepcopy(anat.bowel)
    bowel.phase = bowel.phase + rng.normal(0.0, 0.8, bowel.phase.shape)
    gas = copy.deepcopy(anat.fine)
    gas.phase = rng.uniform(0.0, 2 * np.pi, gas.phase.shape)
    anat.bowel, anat.gas = bowel, gas
    anat.bowel_offset = np.clip(rng.normal(0.0, 8.0, 3), -20.0, 20.0)


def _burn_lesions(lesions: list[LesionInfo], h: Array, labels: Array, xyz: tuple[Array, Array, Array]) -> None:
    """Paint the lesions that reach into one slab: HU into ``h``, their labels into ``labels`` (the slab's view)."""
    xb, yb, zb = (np.broadcast_to(v, h.shape) for v in xyz)
    zs = xyz[2][:, 0, 0]
    for info in lesions:
        c, reach = np.array(info.center_mm), info.radius_mm * 2.6 + 2
        if c[2] + reach < zs[0] or c[2] - reach > zs[-1]:
            continue
        box = (np.abs(xb - c[0]) < reach) & (np.abs(yb - c[1]) < reach) & (np.abs(zb - c[2]) < reach)
        idx = np.nonzero(box)
        f = _lesion_field(info, xb[idx], yb[idx], zb[idx])
        inside = f < 0
        sel = tuple(a[inside] for a in idx)
        h[sel] = _lesion_hu(info, xb[idx][inside], yb[idx][inside], zb[idx][inside], h[sel])
        labels[sel] = info.label


def _blur_and_noise(hu: Array, sp: Array, blur_mm: float, noise_hu: float, nrng: np.random.Generator) -> Array:
    """Partial-volume blur (system PSF) and correlated noise, rounded and clipped to int16 HU."""
    sig = np.maximum(blur_mm / sp[::-1], 0.0)
    if np.any(sig > 0):
        hu = ndimage.gaussian_filter(hu, sigma=sig, mode="nearest", truncate=3.0)
    noise = nrng.standard_normal(hu.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.0, 0.7, 0.7), truncate=2.5)
    noise *= np.float32(noise_hu / max(float(noise.std()), 1e-6))
    hu += noise
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


@dataclass(frozen=True)
class Rendering:
    """How the phantom is rendered: image noise (HU, standard deviation), the scanner's blur (mm) and the number of
    slices evaluated at once (``slab``: bounds the memory of one evaluation)."""

    noise_hu: float = 18.0
    blur_mm: float = 0.9
    slab: int = 8


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = (100, 160, 160),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    n_lesions: int = 6,
    bowel_state: int | None = None,
    rendering: Rendering | None = None,
) -> Phantom:
    """Render the seeded digital patient on a ``shape`` = (nk, nj, ni) grid with ``spacing`` = (si, sj, sk) mm.

    The grid is axial (identity direction) centred on ``center_mm``; the anatomy spans roughly z ∈ [-130, 200] mm
    (upper abdomen to lung apex); lesions lie in z ∈ [-90, 95] mm whatever the grid, so a seed is one patient on
    every grid. ``lesion_info`` lists the lesions that are inside the grid. Same seed and arguments → identical
    output.

    ``bowel_state`` (default None: the seed's own bowel) renders the same patient with the bowel as another scan
    weeks later finds it (peristalsis): loops moved and deformed, gas in other loops; nothing else changes.
    """
    look = rendering or Rendering()
    slab = look.slab
    rng = np.random.default_rng(seed)
    anat = _Anatomy(rng)
    nk, nj, ni = shape
    sp = np.asarray(spacing, float)
    origin = np.asarray(center_mm, float) - sp * (np.array([ni, nj, nk]) - 1) / 2
    grid = Volume(np.zeros((1, 1, 1), np.uint8), origin, sp)
    # lesions are placed in a fixed anatomical region (not the grid), so every grid of a seed shows the same patient
    region = (np.array([-150.0, -110.0, -90.0]), np.array([150.0, 110.0, 95.0]))
    lesions = _place_lesions(anat, np.random.default_rng([seed, 1]), n_lesions, (region[0][2], region[1][2]), region)
    if bowel_state is not None:  # after the lesions are placed: the same lesions, the bowel as another day has it
        _move_bowel(anat, np.random.default_rng([seed, 3, bowel_state]))

    xs = (origin[0] + sp[0] * np.arange(ni)).astype(np.float32)
    ys = (origin[1] + sp[1] * np.arange(nj)).astype(np.float32)
    hu = np.empty(shape, np.float32)
    organs = np.empty(shape, np.uint8)
    labels = np.zeros(shape, np.uint16)
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        zs = (origin[2] + sp[2] * np.arange(k0, k1)).astype(np.float32)
        z3, y3, x3 = zs[:, None, None], ys[None, :, None], xs[None, None, :]
        h, o = anat.evaluate(x3, y3, z3, axes=(xs, ys, zs), voxel_mm=float(sp.min()))
        _burn_lesions(lesions, h, labels[k0:k1], (x3, y3, z3))
        hu[k0:k1] = h
        organs[k0:k1] = o
    ct = _blur_and_noise(hu, sp, look.blur_mm, look.noise_hu, np.random.default_rng([seed, 2]))

    ct_vol = Volume(ct, origin, sp, np.eye(3), {"phantom_seed": seed, "PatientID": f"PHANTOM-{seed:04d}"})
    lesion_vol = Volume(labels, origin, sp, np.eye(3), {"phantom_seed": seed})
    organ_vol = Volume(organs, origin, sp, np.eye(3), {"organs": ORGANS})
    vox = float(np.prod(sp))
    counts = np.bincount(labels.ravel(), minlength=len(lesions) + 1)
    for info in lesions:
        info.volume_mm3 = float(counts[info.label]) * vox
        if counts[info.label]:
            kk, jj, ii = np.nonzero(labels == info.label)
            info.params["centroid_mm"] = grid.index_to_patient(np.array([ii.mean(), jj.mean(), kk.mean()])).tolist()
    lesions = [info for info in lesions if info.volume_mm3 > 0]
    return Phantom(ct_vol, lesion_vol, organ_vol, lesions, seed)
