"""Immutable export snapshots: ``exports/<UTC timestamp>_<run_id>/`` with a sha256 manifest.

A snapshot holds everything needed to reproduce and serve the promoted model:

    runs/<run_id>/...        the run's artifacts (without checkpoints/last.pt)
    data/index/...           the dataset index it was trained on
    models/best.pt, best.json, best.onnx
    config.json              the resolved configuration used to export
    SNAPSHOT.json            what, when, which run, the model's sha256
    MANIFEST.sha256          ``sha256sum`` format, relative paths (``sha256sum -c`` works)

It is built in a temporary directory inside ``exports/`` and renamed into
place only when complete; an existing snapshot is never overwritten, files and
directories are made read-only, and names cannot escape ``exports/``.
``verify_snapshot`` re-hashes everything and names each changed, missing or
extra file.
"""
from __future__ import annotations

import contextlib
import dataclasses as dc
import datetime as dt
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from ..config import Config
from ..io import read_json, write_json, write_text
from ..io import file_sha256

MANIFEST = "MANIFEST.sha256"
SNAPSHOT_FORMAT = "geolocate-snapshot/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class SnapshotError(ValueError):
    """A snapshot that cannot be made (missing inputs, bad or taken name)."""


@dc.dataclass
class VerifyReport:
    path: Path
    checked: int = 0
    changed: list[str] = dc.field(default_factory=list)
    missing: list[str] = dc.field(default_factory=list)
    extra: list[str] = dc.field(default_factory=list)
    problems: list[str] = dc.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra or self.problems)

    def lines(self) -> list[str]:
        out = [f"changed: {p}" for p in self.changed] + [f"missing: {p}" for p in self.missing]
        out += [f"extra: {p}" for p in self.extra] + [f"problem: {p}" for p in self.problems]
        return out


def validate_name(name: str) -> str:
    """A snapshot name is one plain path component: no separators, no '..', not absolute, no hidden names."""
    if not isinstance(name, str) or not name:
        raise SnapshotError("snapshot name must not be empty")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name or os.path.isabs(name):
        raise SnapshotError(f"invalid snapshot name {name!r}: it must be a single name inside exports/ (no '/', '..' or absolute paths)")
    if not _NAME_RE.match(name):
        raise SnapshotError(f"invalid snapshot name {name!r}: use letters, digits and . _ + - (starting with a letter or digit)")
    return name


def snapshot_target(exports_dir: Path, name: str) -> Path:
    validate_name(name)
    root = exports_dir.resolve()
    target = (root / name).resolve()
    if target.parent != root:
        raise SnapshotError(f"snapshot name {name!r} escapes {exports_dir}")
    return target


def _copy_tree(src: Path, dst: Path, skip: set[str] = frozenset()) -> None:
    """Copy regular files (following symlinks to files), skipping relative paths in ``skip``."""
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        rel_dir = Path(dirpath).relative_to(src)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".tmp"))
        for fn in sorted(filenames):
            rel = (rel_dir / fn).as_posix()
            if rel in skip or fn.startswith("."):  # hidden files include interrupted atomic writes
                continue
            s = Path(dirpath) / fn
            if not s.is_file():
                continue
            d = dst / rel_dir / fn
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, d)


def _walk_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for fn in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            out.append((Path(dirpath) / fn).relative_to(root).as_posix())
    return sorted(out)


def write_manifest(root: Path) -> Path:
    lines = []
    for rel in _walk_files(root):
        if rel == MANIFEST:
            continue
        if "\n" in rel or "\\" in rel:
            raise SnapshotError(f"cannot list {rel!r} in a sha256sum manifest")
        lines.append(f"{file_sha256(root / rel)}  {rel}\n")
    return write_text(root / MANIFEST, "".join(lines))


_NO_WRITE = ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
_READ = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
_EXEC = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH


def _make_read_only(root: Path) -> None:
    """chmod a-w (and a+r, a+x on directories) below ``root``."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for fn in filenames:
            p = Path(dirpath) / fn
            if not p.is_symlink():
                p.chmod((p.stat().st_mode | _READ) & _NO_WRITE)
        for d in dirnames:
            p = Path(dirpath) / d
            if not p.is_symlink():
                p.chmod((p.stat().st_mode | _READ | _EXEC) & _NO_WRITE)


def create_snapshot(cfg: Config, name: str | None = None, now: dt.datetime | None = None) -> Path:
    """Build ``exports/<name>`` (default ``<UTC %Y%m%dT%H%M%SZ>_<run_id>``) from models/best.pt's run; return its path."""
    from .export import onnx_bytes, read_onnx_metadata
    from ..models import load_model

    models_dir, runs_dir = Path(cfg.paths.models_dir), Path(cfg.paths.runs_dir)
    index_dir = Path(cfg.paths.data_dir) / "index"
    exports_dir = Path(cfg.paths.exports_dir)
    best_pt, best_json = models_dir / "best.pt", models_dir / "best.json"
    if not best_pt.is_file() or not best_json.is_file():
        raise SnapshotError(f"no {best_pt} / {best_json}: train a model first (`geolocate train`)")
    best = read_json(best_json)
    run_id = str(best.get("run_id") or "")
    if not run_id or not _NAME_RE.match(run_id):
        raise SnapshotError(f"{best_json} names no valid run_id ({run_id!r})")
    run_dir = runs_dir / run_id
    if not run_dir.is_dir():
        raise SnapshotError(f"the best model's run {run_dir} does not exist")
    if not index_dir.is_dir():
        raise SnapshotError(f"no dataset index at {index_dir}: run `geolocate index` first")
    stats_json = index_dir / "stats.json"
    index_fp = read_json(stats_json).get("fingerprint") if stats_json.is_file() else None
    if best.get("dataset_fingerprint") and index_fp != best["dataset_fingerprint"]:
        raise SnapshotError(f"the index in {index_dir} (fingerprint {index_fp}) is not the one the best model was trained on "
                            f"({best['dataset_fingerprint']}): rebuild that index or train on this one before exporting")

    now = now or dt.datetime.now(dt.timezone.utc)
    name = name or f"{now.strftime('%Y%m%dT%H%M%SZ')}_{run_id}"
    exports_dir.mkdir(parents=True, exist_ok=True)
    target = snapshot_target(exports_dir, name)
    if target.exists() or target.is_symlink():
        raise SnapshotError(f"snapshot {target} already exists; snapshots are never overwritten")

    clean_stale_tmp(exports_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", dir=exports_dir))
    try:
        _copy_tree(run_dir, tmp / "runs" / run_id, skip={"checkpoints/last.pt"})
        _copy_tree(index_dir, tmp / "data" / "index")
        (tmp / "models").mkdir()
        shutil.copy2(best_pt, tmp / "models" / "best.pt")
        shutil.copy2(best_json, tmp / "models" / "best.json")
        from ..tasks.refine import gallery_path

        if gallery_path(best_pt).is_file():  # the refinement gallery (its sha256 is pinned inside best.pt)
            shutil.copy2(gallery_path(best_pt), gallery_path(tmp / "models" / "best.pt"))
        model_sha = file_sha256(tmp / "models" / "best.pt")  # the bytes that ship, even if best.pt is promoted meanwhile
        if best.get("sha256") and best["sha256"] != model_sha:
            raise SnapshotError(f"{best_pt} does not match the sha256 recorded in {best_json}: refusing to snapshot it")
        onnx_src = best_pt.with_suffix(".onnx")
        try:
            fresh = onnx_src.is_file() and read_onnx_metadata(onnx_src).get("source_sha256") == model_sha
        except Exception:  # noqa: BLE001 - unreadable: export again
            fresh = False
        if fresh:
            shutil.copy2(onnx_src, tmp / "models" / "best.onnx")
        else:
            model, info = load_model(best_pt)
            (tmp / "models" / "best.onnx").write_bytes(onnx_bytes(model, info, model_sha))
        write_json(tmp / "config.json", cfg.to_dict())
        from .. import __version__ as version  # noqa: PLC0415

        write_json(tmp / "SNAPSHOT.json", {
            "format": SNAPSHOT_FORMAT, "name": name, "created_at": now.isoformat(timespec="seconds"),
            "run_id": run_id, "model_sha256": model_sha, "best": best, "geolocate_version": version,
        })
        write_manifest(tmp)
        _make_read_only(tmp)
        # Claim the name atomically (fails if another process took it), then move the finished tree onto it.
        try:
            os.mkdir(target)
        except FileExistsError:
            raise SnapshotError(f"snapshot {target} already exists; snapshots are never overwritten") from None
        try:
            os.rename(tmp, target)
        except OSError:
            target.rmdir()  # give the claimed name back
            raise
        target.chmod((target.stat().st_mode | _READ | _EXEC) & _NO_WRITE)
    except BaseException:
        _force_rmtree(tmp)
        raise
    return target


_TMP_PREFIX = ".tmp-snapshot-"
STALE_TMP_S = 15 * 60  # a build directory untouched this long belongs to no live export


def clean_stale_tmp(exports_dir: Path, now: float | None = None) -> list[Path]:
    """Remove ``.tmp-snapshot-*`` build directories left by killed exports; return what was removed.

    A directory is stale when the pid in its name (``.tmp-snapshot-<pid>-...``) is not running, or when it has no
    pid (older versions) and was last modified more than :data:`STALE_TMP_S` seconds ago.
    """
    now = time.time() if now is None else now
    removed = []
    for d in sorted(exports_dir.glob(f"{_TMP_PREFIX}*")):
        if d.is_symlink() or not d.is_dir():
            continue
        pid_text = d.name[len(_TMP_PREFIX):].split("-", 1)[0]
        try:
            if pid_text.isdigit() and int(pid_text) != os.getpid():
                stale = not _pid_alive(int(pid_text))
            else:
                stale = pid_text != str(os.getpid()) and now - d.stat().st_mtime > STALE_TMP_S
        except OSError:
            continue
        if stale:
            _force_rmtree(d)
            removed.append(d)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _force_rmtree(path: Path) -> None:
    if not path.exists():
        return
    for dirpath, dirnames, _ in os.walk(path):
        for d in [dirpath, *(os.path.join(dirpath, x) for x in dirnames)]:
            with contextlib.suppress(OSError):
                os.chmod(d, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def read_manifest(path: Path) -> tuple[dict[str, str], list[str]]:
    """({relative path: sha256}, problems) for a MANIFEST.sha256 file."""
    entries: dict[str, str] = {}
    problems: list[str] = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        return entries, [f"{MANIFEST} is not UTF-8 text (byte {e.start}): it was damaged or replaced"]
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE_RE.match(line)
        if not m:
            problems.append(f"{MANIFEST} line {i} is malformed")
            continue
        digest, rel = m.groups()
        parts = Path(rel).parts
        if rel.startswith("/") or os.path.isabs(rel) or ".." in parts or "\\" in rel:
            problems.append(f"{MANIFEST} line {i} names a path outside the snapshot: {rel!r}")
            continue
        if rel in entries:
            problems.append(f"{MANIFEST} lists {rel} twice")
        entries[rel] = digest
    return entries, problems


def verify_snapshot(path: str | Path) -> VerifyReport:
    """Re-hash every file against MANIFEST.sha256; report changed, missing and extra files by name."""
    root = Path(path)
    report = VerifyReport(path=root)
    if not root.is_dir():
        report.problems.append(f"{root} is not a directory")
        return report
    manifest = root / MANIFEST
    if not manifest.is_file():
        report.problems.append(f"{MANIFEST} is missing")
        return report
    entries, report.problems = read_manifest(manifest)
    present = set(_walk_files(root)) - {MANIFEST}
    for rel, digest in sorted(entries.items()):
        p = root / rel
        if p.is_symlink():
            report.changed.append(rel)
            report.problems.append(f"{rel} is a symlink")
        elif not p.is_file():
            report.missing.append(rel)
        else:
            report.checked += 1
            if file_sha256(p) != digest:
                report.changed.append(rel)
    report.extra = sorted(present - set(entries))
    return report
