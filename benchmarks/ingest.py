"""Benchmark DICOM-series-to-volume ingestion: ResDx against dcm2niix, dicom2nifti and MONAI.

What it measures: the whole-process wall time a user sees when one DICOM series (by default
a synthetic 300 x 512 x 512 int16 CT, generated deterministically) becomes a volume. Every
run is a fresh subprocess, so interpreter start-up and imports (torch for MONAI) count.
Readers:

  resdx-cli      ``resdx convert FOLDER out.nii``                  (the console script, whole process)
  resdx-convert  ``pipeline.stages.convert.convert(folder, out.nii)`` (read + write NIfTI)
  resdx-read     ``pipeline.io.dicom.read_dicom_series(folder)``     (read only, in memory)
  dcm2niix       ``dcm2niix -z n -b n -o OUT -f out FOLDER``         (single-threaded C)
  dicom2nifti    ``dicom2nifti.dicom_series_to_nifti(folder, out.nii, reorient_nifti=False)``
  monai          ``LoadImage(reader="PydicomReader", image_only=True)(folder)``  (in memory)
  resdx-import   ``import pipeline.stages.convert`` only: the fixed cost (interpreter + imports) that
                 every Python reader pays before its first file; a floor, not a reader

Method: the series' files are read once (untimed, which also checks their SHA-256) to warm
the page cache; each reader then runs once untimed (warm-up: imports and .pyc files cached)
and that run's output is checked: every reader must give the same voxel grid and the same
HU values once put in one orientation (nibabel's closest-canonical RAS), otherwise the run
fails. Then ``--repeat`` timed runs per reader, round-robin so that drift on the machine
hits all readers alike; outputs are deleted between runs, untimed. Children get the caller's
environment except that byte-code is cached under WORKDIR/pycache (PYTHONPYCACHEPREFIX, and
PYTHONDONTWRITEBYTECODE dropped), so every timed run imports from warm .pyc files and nothing
is written into the source tree. The CPU that other processes used during each timed run is
measured from /proc/stat and reported: wall times are only meaningful on an idle machine.

Numbers: median and min wall seconds; slices/s = slices / median; peak RSS is the reader
process's ``ru_maxrss`` (the kernel's high-water mark of resident memory, no polling), taken by
GNU ``/usr/bin/time -f %M`` or, without it, by ``os.wait4`` in a minimal launcher process. Not
by ``os.wait4``/``RUSAGE_CHILDREN`` in this script: a forked child's high-water mark starts at
its parent's RSS, and RUSAGE_CHILDREN is a max over all children, so deltas say nothing.
CPU s is the reader's user and system time (their sum above wall time means more than one
core was busy; system time is page faults and file I/O, and is the noisy part on a VM).
Ratio = median / dcm2niix median, i.e. wall time on this machine, not per core.

Run: ``.venv/bin/python benchmarks/ingest.py`` (or ``make bench``); ``--help`` for options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/machine.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
GENERATOR_VERSION = 1  # bump when the synthetic series changes, so cached copies are regenerated
SEED = 20261126
PIXEL_SPACING_MM = 0.7
SLICE_THICKNESS_MM = 1.0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# --------------------------------------------------------------------------- synthetic series


def _soft_inside(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Smooth 0..1 mask of an ellipse, edges blurred over ~1 mm like a real partial-volume edge."""
    if a <= 0 or b <= 0:
        return np.zeros_like(x)
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return 0.5 * (1.0 + np.tanh((1.0 - r) * min(a, b) / 0.8))


def _blend(hu: np.ndarray, mask: np.ndarray, value: float | np.ndarray) -> np.ndarray:
    return hu * (1.0 - mask) + value * mask


def phantom_slice(x: np.ndarray, y: np.ndarray, t: float) -> np.ndarray:
    """HU of one axial slice of a smooth trunk phantom; x right-to-left, y front-to-back (LPS mm).

    `t` in [0, 1] runs from the pelvis (0) to the shoulders (1). Air, fat, muscle, lungs,
    liver, kidneys, aorta, vertebra and a patient table, with gentle low-frequency texture:
    plausible CT histograms and edges, but no random noise.
    """
    hu = np.full(x.shape, -1000.0)
    hu = _blend(hu, _soft_inside(x, y, 0, 150, 190, 14) * (y > 140), 250.0)  # table (curved plate)
    a, b = 160 + 12 * math.sin(2.1 * t + 0.4), 112 + 8 * math.cos(1.7 * t)
    hu = _blend(hu, _soft_inside(x, y, 0, 0, a, b), -95.0)  # subcutaneous fat
    texture = 12 * np.sin(x / 23.0 + 3 * t) * np.cos(y / 31.0 - 2 * t) + 6 * np.sin((x + y) / 11.0)
    hu = _blend(hu, _soft_inside(x, y, 0, 0, a - 14, b - 12), 42.0 + texture)  # muscle / organs
    lung = max(0.0, math.sin(math.pi * (t - 0.45) / 0.55)) ** 0.5 if t > 0.45 else 0.0
    for side in (-1, 1):
        hu = _blend(hu, _soft_inside(x, y, side * 68, -8, 52 * lung, 74 * lung), -840.0 + 0.4 * texture)
        kidney = max(0.0, math.sin(math.pi * (t - 0.2) / 0.25)) if 0.2 < t < 0.45 else 0.0
        hu = _blend(hu, _soft_inside(x, y, side * 62, 40, 24 * kidney, 34 * kidney), 160.0)  # enhanced kidneys
    liver = max(0.0, math.sin(math.pi * (t - 0.3) / 0.35)) if 0.3 < t < 0.65 else 0.0
    hu = _blend(hu, _soft_inside(x, y, -55, 5, 75 * liver, 70 * liver), 62.0 + 0.5 * texture)
    hu = _blend(hu, _soft_inside(x, y, 18, 42, 12, 12), 185.0)  # contrast-filled aorta
    hu = _blend(hu, _soft_inside(x, y, 0, 70, 21, 17), 1050.0)  # vertebral body: cortex ...
    hu = _blend(hu, _soft_inside(x, y, 0, 70, 17, 13), 260.0)  # ... around trabecular bone
    hu = _blend(hu, _soft_inside(x, y, 0, 98, 9, 14), 900.0)  # spinous process
    return hu


def _uid(*parts: object) -> str:
    import pydicom.uid

    return pydicom.uid.generate_uid(entropy_srcs=["resdx-bench", str(GENERATOR_VERSION), *map(str, parts)])


def generate_series(folder: Path, n_slices: int, size: int, spacing: float = PIXEL_SPACING_MM,
                    thickness: float = SLICE_THICKNESS_MM, rle: bool = False, name: str = "") -> None:
    """Write a CT series (CT Image Storage, explicit VR little endian, or RLE Lossless with `rle`) with
    shuffled file names. `name` tells apart the series of a cohort (their UIDs); the defaults give the
    benchmark's one series, byte for byte as before these options."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    folder.mkdir(parents=True, exist_ok=True)
    key = (n_slices, size) + ((spacing, thickness, rle, name) if name else ())
    study, series, frame_of_ref = _uid(*key, "study"), _uid(*key, "series"), _uid(*key, "for")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RESDX_BENCH_1"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "ResDx synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "ResDx ingest benchmark"
    ds.SeriesDescription = f"synthetic trunk {n_slices}x{size}x{size}"
    ds.PatientName = "Bench^Phantom"
    ds.PatientID = "BENCH0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{thickness:.1f}" if name else f"{SLICE_THICKNESS_MM:.1f}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_of_ref
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed int16
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"

    half = (size - 1) / 2 * spacing
    coords = np.arange(size) * spacing - half
    x, y = np.meshgrid(coords, coords)  # x varies along a row (columns), y down the image (rows)
    names = [f"IM{n:06d}" for n in random.Random(SEED).sample(range(10 * n_slices), n_slices)]
    for k in range(n_slices):  # acquisition order: head first, so z falls as InstanceNumber rises
        z = -k * thickness
        t = 1.0 - k / max(1, n_slices - 1)
        stored = np.clip(np.rint(phantom_slice(x, y, t)), -1024, 3071).astype(np.int16) + np.int16(1024)
        sop = _uid(*key, "sop", k)
        meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{-half:.4f}", f"{-half:.4f}", f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        if rle:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian  # compress() sets it again
            ds.compress(RLELossless, stored.astype("<i2"), encoding_plugin="pylibjpeg", generate_instance_uid=False)
        else:
            ds.PixelData = stored.astype("<i2").tobytes()
        pydicom.dcmwrite(folder / names[k], ds, enforce_file_format=True)


def series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def warm_and_hash(folder: Path) -> tuple[str, int, int]:
    """Read every file once (warms the page cache); returns (sha256 over names + bytes, files, bytes)."""
    digest, n_bytes = hashlib.sha256(), 0
    files = series_files(folder)
    for path in files:
        data = path.read_bytes()
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(data)
        n_bytes += len(data)
    return digest.hexdigest(), len(files), n_bytes


def prepare_series(work: Path, n_slices: int, size: int) -> tuple[Path, str, int, int, bool]:
    """The synthetic series under `work`, generated unless an identical one is cached there."""
    folder = work / f"ct-{n_slices}x{size}x{size}"
    stamp = work / f"{folder.name}.json"
    params = {"generator": GENERATOR_VERSION, "slices": n_slices, "size": size, "seed": SEED}
    if stamp.exists() and folder.is_dir():
        recorded = json.loads(stamp.read_text())
        if recorded.get("params") == params:
            digest, n_files, n_bytes = warm_and_hash(folder)
            if digest == recorded.get("sha256"):
                return folder, digest, n_files, n_bytes, False
    shutil.rmtree(folder, ignore_errors=True)
    generate_series(folder, n_slices, size)
    digest, n_files, n_bytes = warm_and_hash(folder)
    stamp.write_text(json.dumps({"params": params, "sha256": digest}, indent=2) + "\n")
    return folder, digest, n_files, n_bytes, True


# --------------------------------------------------------------------------- readers

# Each Python reader runs as `python -c CODE FOLDER OUTDIR CHECK`. With CHECK=1 (warm-up run,
# untimed) the in-memory readers save their array and affine for the cross-check.
_SAVE = """
if sys.argv[3] == "1":
    import numpy as np
    np.save(sys.argv[2] + "/data.npy", np.asarray(data, dtype=np.float32))
    np.save(sys.argv[2] + "/affine.npy", np.asarray(affine, dtype=np.float64))
"""

CODE = {
    "resdx-convert": """
import sys
from pipeline.stages.convert import convert
convert(sys.argv[1], sys.argv[2] + "/out.nii")
""",
    "resdx-read": """
import sys
from pipeline.io.dicom import read_dicom_series
vol = read_dicom_series(sys.argv[1])
data, affine = vol.data, vol.affine
""" + _SAVE,
    "resdx-import": """
import sys
import pipeline.stages.convert  # what resdx-convert imports; reads nothing
""",
    "dicom2nifti": """
import sys
import dicom2nifti
dicom2nifti.dicom_series_to_nifti(sys.argv[1], sys.argv[2] + "/out.nii", reorient_nifti=False)
""",
    "monai": """
import sys
from monai.transforms import LoadImage
img = LoadImage(reader="PydicomReader", image_only=True)(sys.argv[1])
data, affine = img.numpy(), img.affine.numpy()
""" + _SAVE,
}


@dataclass
class Reader:
    name: str
    label: str
    module: str | None  # Python distribution that must be importable; None for dcm2niix
    writes_nifti: bool
    makes_volume: bool = True  # False: a fixed-cost floor, no output to check and no slices/s

    def command(self, folder: Path, out: Path, check: bool, dcm2niix: str) -> list[str]:
        if self.name == "dcm2niix":
            return [dcm2niix, "-z", "n", "-b", "n", "-o", str(out), "-f", "out", str(folder)]
        if self.name == "resdx-cli":  # the console script a user types, with its argument parsing and summary
            return [str(Path(sys.executable).with_name("resdx")), "convert", str(folder), str(out / "out.nii")]
        return [sys.executable, "-c", CODE[self.name], str(folder), str(out), "1" if check else "0"]


READERS = [
    Reader("resdx-cli", "`resdx convert` CLI → .nii", "resdx", True),
    Reader("resdx-convert", "ResDx convert → .nii", "resdx", True),
    Reader("resdx-read", "ResDx read_dicom_series (no write)", "resdx", False),
    Reader("dcm2niix", "dcm2niix -z n", None, True),
    Reader("dicom2nifti", "dicom2nifti → .nii", "dicom2nifti", True),
    Reader("monai", "MONAI LoadImage(PydicomReader) (no write)", "monai", False),
    Reader("resdx-import", "(floor) python + ResDx imports only", "resdx", False, makes_volume=False),
]


@dataclass
class Result:
    reader: Reader
    walls: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    sys: list[float] = field(default_factory=list)
    background: list[float] = field(default_factory=list)
    error: str = ""
    grid: tuple[int, ...] = ()
    check: str = ""


@dataclass
class RunOutcome:
    wall: float
    maxrss_kib: int
    cpu: float  # user + system seconds of the reader process
    sys: float  # of which system (kernel: page faults, file I/O)
    returncode: int
    log: str
    background: float = 0.0  # share of the machine's CPU used by other processes meanwhile


# Fallback when GNU time is missing: a bare interpreter (-S -I, ~5 MiB) forks and execs the reader
# and reports that grandchild's rusage. Not the benchmark process itself: a child's ru_maxrss starts
# at its parent's RSS (the fork copy is counted before exec), which would be this script's ~100 MiB.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_pid, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss} {ru.ru_utime} {ru.ru_stime}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def gnu_time() -> str | None:
    """/usr/bin/time if it is GNU time (whose -f %M is the child's ru_maxrss in KiB)."""
    path = shutil.which("time", path="/usr/bin:/bin")
    if not path:
        return None
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    return path if "GNU" in proc.stdout + proc.stderr else None


GNU_TIME = gnu_time()
RSS_METHOD = (
    f"GNU time ({GNU_TIME} -f '%M %U %S'): ru_maxrss of the reader process from wait4, floor ~1 MiB"
    if GNU_TIME else
    "os.wait4 in a minimal `python -S -I` launcher that forks+execs the reader: ru_maxrss, floor ~5 MiB"
)


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat; (0, 0) where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - fields[3] - fields[4], total


BUSY = 0.10  # share of the machine's CPU used by other processes above which a run counts as contaminated
RETRIES = 3  # with --wait-idle: contaminated timed runs are discarded and redone up to this many times


def wait_for_idle(limit_s: float, threshold: float = BUSY) -> float:
    """Wait (up to `limit_s`) for a 1 s window in which the machine is < `threshold` busy; returns that load."""
    deadline = time.monotonic() + limit_s
    while True:
        busy0, total0 = cpu_ticks()
        time.sleep(1.0)
        busy1, total1 = cpu_ticks()
        load = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        if load < threshold or time.monotonic() >= deadline:
            return load


def child_env(work: Path) -> dict[str, str]:
    """The caller's environment, but byte-code cached in `work`: imports cost the same on every
    timed run whether or not PYTHONDONTWRITEBYTECODE is set, and nothing is written into the tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def run_child(cmd: list[str], out: Path, env: dict[str, str] | None = None) -> RunOutcome:
    """Run `cmd` in a fresh process (output dir emptied first); wall time from spawn to exit."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log_path, usage_path = out.parent / f"{out.name}.log", out.parent / f"{out.name}.rusage"
    usage_path.unlink(missing_ok=True)
    if GNU_TIME:
        wrapped = [GNU_TIME, "-f", "%M %U %S", "-o", str(usage_path), "--", *cmd]
    else:
        wrapped = [sys.executable, "-S", "-I", "-c", _LAUNCHER, str(usage_path), *cmd]
    with open(log_path, "wb") as log:
        busy0, total0 = cpu_ticks()
        start = time.perf_counter()
        proc = subprocess.run(wrapped, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              env=env, check=False)
        wall = time.perf_counter() - start
        busy1, total1 = cpu_ticks()
    try:
        # GNU time writes "Command exited with non-zero status N" first on failure: the numbers are last.
        rss, utime, stime = usage_path.read_text().strip().splitlines()[-1].split()
        maxrss, cpu, sys_s = int(rss), float(utime) + float(stime), float(stime)
    except (OSError, IndexError, ValueError):
        maxrss, cpu, sys_s = 0, float("nan"), float("nan")
    # CPU used on the machine by everything else while the reader ran, as a share of all cores.
    # /proc/stat counts whole clock ticks per core: allow one tick per core at each end.
    tick = 1 / os.sysconf("SC_CLK_TCK")
    busy_s, cores = (busy1 - busy0) * tick, (total1 - total0) * tick / max(wall, 1e-9)
    others = busy_s - cpu - 2 * tick * cores
    background = max(0.0, others) / (wall * cores) if total1 > total0 and cpu == cpu else 0.0
    return RunOutcome(wall=wall, maxrss_kib=maxrss, cpu=cpu, sys=sys_s, returncode=proc.returncode,
                      log=log_path.read_text(errors="replace"), background=background)


def load_output(reader: Reader, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data float32, voxel-to-RAS affine) of a reader's check run."""
    import nibabel as nib

    if reader.writes_nifti:
        niftis = sorted(out.glob("*.nii"))
        if len(niftis) != 1:
            raise RuntimeError(f"expected one .nii in {out}, found {[p.name for p in niftis]}")
        img = nib.load(str(niftis[0]))
        return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)
    return np.load(out / "data.npy"), np.load(out / "affine.npy")


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip axes to the closest RAS+ orientation (as nibabel.as_closest_canonical)."""
    from nibabel import orientations as ornt_mod

    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    ornt = ornt_mod.io_orientation(affine)
    out = ornt_mod.apply_orientation(data, ornt)
    return out, affine @ ornt_mod.inv_ornt_aff(ornt, data.shape)


def compare(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> str:
    """'ok' when grid, geometry (to 0.01 mm) and HU values (to 0.5) agree; else what differs."""
    (rd, ra), (gd, ga) = ref, got
    if rd.shape != gd.shape:
        return f"grid {gd.shape} != {rd.shape}"
    geom = float(np.max(np.abs(ra - ga)))
    if geom > 0.01:
        return f"affine differs by {geom:.3g} mm"
    diff = float(np.max(np.abs(rd - gd)))
    if diff > 0.5:
        return f"values differ by up to {diff:.4g}"
    return "ok"


# --------------------------------------------------------------------------- report


def version_of(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def dcm2niix_version(binary: str) -> str:
    try:
        proc = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "not found"
    for line in (proc.stdout + proc.stderr).splitlines():
        if "version" in line.lower():
            return line.strip()
    return (proc.stdout + proc.stderr).strip().splitlines()[-1] if (proc.stdout + proc.stderr).strip() else "?"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (" + uncommitted changes under pipeline/" if dirty else "")


def environment(dcm2niix: str) -> list[tuple[str, str]]:
    return [
        ("date", dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("command", shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))),
        ("machine", f"{platform.platform()}; {cpu_model()}"),
        ("peak RSS", RSS_METHOD),
        ("nproc", f"{len(os.sched_getaffinity(0))} (os.cpu_count() = {os.cpu_count()})"),
        ("python", platform.python_version()),
        ("torch", version_of("torch")),
        ("pydicom", version_of("pydicom")),
        ("numpy", version_of("numpy")),
        ("nibabel", version_of("nibabel")),
        ("monai", version_of("monai")),
        ("dicom2nifti", version_of("dicom2nifti")),
        ("dcm2niix", f"{dcm2niix_version(dcm2niix)} ({dcm2niix})"),
        ("resdx", f"{version_of('resdx')} at git {git_state()}"),
    ]


def markdown_table(results: list[Result], n_slices: int) -> str:
    base = next((r for r in results if r.reader.name == "dcm2niix" and r.walls), None)
    base_med = statistics.median(base.walls) if base else None
    rows = [
        "| reader | median s | min s | slices/s | peak RSS MiB | CPU s user / sys | × dcm2niix | output grid | check |",
        "|---|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in results:
        if not r.walls:
            rows.append(f"| {r.reader.label} | – | – | – | – | – | – | – | {r.error or r.check} |")
            continue
        med = statistics.median(r.walls)
        ratio = f"{med / base_med:.2f}×" if base_med else "–"
        grid = "×".join(map(str, r.grid)) if r.grid else "–"
        rate = f"{n_slices / med:.0f}" if r.reader.makes_volume else "–"
        user, kernel = statistics.median(c - k for c, k in zip(r.cpus, r.sys)), statistics.median(r.sys)
        rows.append(
            f"| {r.reader.label} | {med:.2f} | {min(r.walls):.2f} | {rate} | "
            f"{max(r.rss_kib) / 1024:.0f} | {user:.2f} / {kernel:.2f} | {ratio} | {grid} | {r.check} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/resdx-bench"),
                   help="where the synthetic series is generated (and cached) and outputs are written")
    p.add_argument("--slices", type=int, default=300, help="slices of the synthetic series")
    p.add_argument("--size", type=int, default=512, help="rows = columns of the synthetic series")
    p.add_argument("--source", type=Path, help="benchmark this existing series folder instead of generating one")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per reader")
    p.add_argument("--readers", default=",".join(r.name for r in READERS),
                   help="comma-separated subset of: " + ", ".join(r.name for r in READERS))
    p.add_argument("--dcm2niix", default=None, help="dcm2niix binary (default: next to this Python, then PATH)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each timed run, wait up to this long for the machine to be < 10%% busy, "
                   "and redo (up to 3 times) runs during which other processes used more")
    p.add_argument("--json", type=Path, help="also write the raw timings here")
    args = p.parse_args(argv)
    if args.slices < 2 or args.size < 16 or args.repeat < 1:
        p.error("need --slices >= 2, --size >= 16, --repeat >= 1")
    unknown = set(args.readers.split(",")) - {r.name for r in READERS}
    if unknown:
        p.error(f"unknown reader(s): {', '.join(sorted(unknown))}")
    return args


def find_dcm2niix(explicit: str | None) -> str:
    if explicit:
        return explicit
    local = Path(sys.executable).parent / "dcm2niix"
    return str(local) if local.exists() else (shutil.which("dcm2niix") or "dcm2niix")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dcm2niix = find_dcm2niix(args.dcm2niix)
    wanted = args.readers.split(",")
    readers = [r for r in READERS if r.name in wanted]
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    if args.source:
        folder = args.source.resolve()
        if not folder.is_dir():
            print(f"--source {folder} is not a folder", file=sys.stderr)
            return 2
        digest, n_files, n_bytes = warm_and_hash(folder)
        origin = "existing series (--source)"
    else:
        t0 = time.perf_counter()
        folder, digest, n_files, n_bytes, made = prepare_series(work, args.slices, args.size)
        origin = (f"synthetic CT, generated in {time.perf_counter() - t0:.1f} s" if made
                  else "synthetic CT, cached copy verified by SHA-256")
    print(f"# ResDx ingest benchmark\n\nseries: {folder} — {n_files} files, {n_bytes / 2**20:.1f} MiB, "
          f"sha256 {digest[:16]}… ({origin}); page cache warmed by reading every file once\n")
    for key, value in environment(dcm2niix):
        print(f"- {key}: {value}")
    print(flush=True)

    outputs = work / "out"
    env = child_env(work)
    results = [Result(r) for r in readers]
    available = []
    for res in results:
        r = res.reader
        if r.module and version_of(r.module) == "not installed":
            res.error = f"skipped: {r.module} not installed"
        elif r.name == "dcm2niix" and not shutil.which(dcm2niix):
            res.error = f"skipped: {dcm2niix} not found"
        else:
            available.append(res)

    # Warm-up and correctness: one untimed run each, outputs compared in one orientation.
    canon: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for res in available:
        out = outputs / f"{res.reader.name}-check"
        print(f"warm-up + check: {res.reader.name} ...", end=" ", flush=True)
        outcome = run_child(res.reader.command(folder, out, True, dcm2niix), out, env)
        if outcome.returncode != 0:
            res.error = f"failed (exit {outcome.returncode}): {outcome.log.strip().splitlines()[-1:]}"
            print(res.error)
            continue
        if not res.reader.makes_volume:
            res.check = "n/a"
            print(f"{outcome.wall:.2f} s (cpu {outcome.cpu:.2f})")
            continue
        try:
            data, affine = load_output(res.reader, out)
        except (OSError, RuntimeError, ValueError) as err:
            res.error = f"unreadable output: {err}"
            print(res.error)
            continue
        res.grid = tuple(data.shape)
        canon[res.reader.name] = canonical(data, affine)
        del data
        shutil.rmtree(out, ignore_errors=True)
        print(f"{outcome.wall:.2f} s (cpu {outcome.cpu:.2f}), grid {'×'.join(map(str, res.grid))}")
    ref_name = "dcm2niix" if "dcm2niix" in canon else next(iter(canon), None)
    for res in available:
        if res.reader.name in canon and ref_name:
            res.check = compare(canon[ref_name], canon[res.reader.name])
            if res.reader.name == ref_name:
                res.check = "reference"
    n_slices = canon[ref_name][0].shape[2] if ref_name else n_files
    canon.clear()

    timed = [res for res in available if not res.error]
    for rep in range(args.repeat):
        for res in timed:
            out = outputs / res.reader.name
            attempts = 1 + (RETRIES if args.wait_idle else 0)
            for attempt in range(attempts):
                if args.wait_idle:
                    wait_for_idle(args.wait_idle)
                outcome = run_child(res.reader.command(folder, out, False, dcm2niix), out, env)
                shutil.rmtree(out, ignore_errors=True)
                if outcome.returncode != 0 or outcome.background <= BUSY or attempt == attempts - 1:
                    break
                print(f"run {rep + 1}/{args.repeat} {res.reader.name:14s} {outcome.wall:7.2f} s  discarded: "
                      f"other processes used {outcome.background:.0%} of the CPU", flush=True)
            if outcome.returncode != 0:
                res.error = f"failed in timed run {rep + 1} (exit {outcome.returncode})"
                continue
            res.walls.append(outcome.wall)
            res.rss_kib.append(outcome.maxrss_kib)
            res.cpus.append(outcome.cpu)
            res.sys.append(outcome.sys)
            res.background.append(outcome.background)
            print(f"run {rep + 1}/{args.repeat} {res.reader.name:14s} {outcome.wall:7.2f} s  "
                  f"{outcome.maxrss_kib / 1024:7.0f} MiB  cpu {outcome.cpu:6.2f} s (sys {outcome.sys:5.2f})  "
                  f"other load {outcome.background:4.0%}", flush=True)
    for res in timed:
        if res.error:
            res.walls.clear()

    print(f"\n{n_slices} slices; median of {args.repeat} fresh-process runs; ratio = median / dcm2niix median\n")
    print(markdown_table(results, n_slices))
    loads = [b for r in results for b in r.background]
    if loads:
        print(f"\nother processes used {statistics.median(loads):.0%} (median), {max(loads):.0%} (max) of the "
              "machine's CPU during timed runs", end="")
        print(": timings are contaminated, rerun on a quiet machine (or with --wait-idle)" if max(loads) > BUSY
              else "", end="\n")

    if args.json:
        args.json.write_text(json.dumps({
            "env": dict(environment(dcm2niix)), "series": str(folder), "sha256": digest, "slices": n_slices,
            "results": {r.reader.name: {"wall_s": r.walls, "maxrss_kib": r.rss_kib, "cpu_s": r.cpus, "sys_s": r.sys,
                                        "other_load": r.background,
                                        "grid": r.grid, "check": r.check, "error": r.error} for r in results},
        }, indent=2) + "\n")
    bad = [r.reader.name for r in available if r.error or r.check not in ("ok", "reference", "n/a")]
    if bad:
        print(f"\nFAILED or mismatched: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
