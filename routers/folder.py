"""The router folder: a fitted router on disk, versioned, as `coe router fit` and the serving
policies write it and `policies: {NAME: {router_path: DIR}}` serves it.

    DIR/router.json    the fitted state: the router's name and settings (JSON)
    DIR/arrays.npz     the fitted arrays (numpy, loaded with allow_pickle=False: never pickle)
    DIR/manifest.json  what the folder is: format version, router name and options, the embedder
                       it was fitted with, its experts, the fitting data's fingerprint, the cost
                       calibration, creation info, and a SHA-256 of the two files above

The manifest is written last and names the hashes of the files it goes with, so a reader never
takes a half-rewritten folder (a `coe router calibrate` while a server reloads) for a router:
it says the folder changed and to read it again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from core.errors import CoeError, first_problem

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "router.json"
ARRAYS = "arrays.npz"


class FittingData(BaseModel):
    """The data a router was fitted on, by fingerprint (a SHA-256 of its texts, experts,
    outcomes and categories): two folders with the same fingerprint saw the same data."""

    fingerprint: str
    rows: int
    source: str | None = None  # a file, a data set name, `catalog examples`, `feedback`
    format: str | None = None  # the outcome file format, where it came from a file


class Calibration(BaseModel):
    """The cost knob as `calibrate` set it: the threshold for a target share of calls to the most
    expensive expert(s), the share it gives, and the most it can give (at threshold 0)."""

    cost_threshold: float
    target_share: float
    achieved_share: float
    max_share: float
    most_expensive: list[str]
    queries: int
    at: str = Field(default_factory=lambda: now_iso())


class Created(BaseModel):
    at: str = Field(default_factory=lambda: now_iso())
    coe_version: str = Field(default_factory=lambda: coe_version())


class RouterManifest(BaseModel):
    format_version: int
    router: str
    options: dict = Field(default_factory=dict)
    embedder: str | None = None  # the query embedder the router was fitted with; None: it embeds nothing
    experts: list[str]
    data: FittingData | None = None
    calibration: Calibration | None = None
    created: Created = Field(default_factory=Created)
    files: dict[str, str] = Field(default_factory=dict)  # file name -> SHA-256


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def coe_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coe")
    except PackageNotFoundError:
        return "unknown"


def fingerprint(texts: list[str], experts: list[str], outcomes: np.ndarray, categories: list[str] | None) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"experts": experts, "texts": texts, "categories": categories}).encode())
    digest.update(np.ascontiguousarray(np.nan_to_num(np.asarray(outcomes, dtype=np.float64), nan=-1.0)).tobytes())
    return "sha256:" + digest.hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def json_safe(options: dict) -> dict:
    """The options that describe a router (JSON values), not the objects handed to it."""
    safe = {}
    for key, value in options.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        safe[key] = value
    return safe


def write_router_folder(directory: str | Path, manifest: RouterManifest, state: dict, arrays: dict[str, np.ndarray]) -> RouterManifest:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CoeError(f"cannot save the router to {directory}: it is a file", "pass a folder path to --out")
    directory.mkdir(parents=True, exist_ok=True)
    state_bytes = json.dumps(state, indent=2).encode()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    arrays_bytes = buffer.getvalue()
    manifest = manifest.model_copy(update={"format_version": FORMAT_VERSION,
                                           "files": {STATE: _sha256(state_bytes), ARRAYS: _sha256(arrays_bytes)}})
    _write_atomic(directory / STATE, state_bytes)
    _write_atomic(directory / ARRAYS, arrays_bytes)
    _write_atomic(directory / MANIFEST, manifest.model_dump_json(indent=2).encode())
    return manifest


def read_manifest(directory: str | Path) -> RouterManifest:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        if (directory / STATE).is_file():
            raise CoeError(f"router folder {directory} has no {MANIFEST}: it was saved by a coe before router folders were "
                           f"versioned", "refit it: coe router fit --router NAME --data DATA --out DIR")
        raise CoeError(f"no saved router in {directory}", "fit one first: coe router fit --router NAME --data DATA --out DIR")
    try:
        raw = json.loads(path.read_text())
    except ValueError:
        raise CoeError(f"{path} is not valid JSON", "refit the router or copy the folder again") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if not isinstance(version, int):
        raise CoeError(f"{path} has no format_version: not a coe router folder", "refit the router")
    if version > FORMAT_VERSION:
        raise CoeError(f"router folder {directory} has format version {version}, newer than this coe reads ({FORMAT_VERSION})",
                       "upgrade coe, or refit the router with this one")
    if version < FORMAT_VERSION:
        raise CoeError(f"router folder {directory} has format version {version}, older than this coe reads ({FORMAT_VERSION})",
                       "refit the router with this coe")
    try:
        return RouterManifest.model_validate(raw)
    except ValidationError as exc:
        raise CoeError(f"{path}: {first_problem(exc)}", "refit the router") from None


def read_router_folder(directory: str | Path) -> tuple[RouterManifest, dict, dict[str, np.ndarray]]:
    """The manifest, the fitted state and arrays, checked against the manifest's hashes."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    contents = {}
    for name in (STATE, ARRAYS):
        path = directory / name
        data = path.read_bytes() if path.is_file() else b""
        if _sha256(data) != manifest.files.get(name):
            raise CoeError(f"router folder {directory}: {name} does not match its manifest (missing, damaged, or being "
                           f"rewritten right now)", "read it again in a moment; if it persists, refit or copy the folder again")
        contents[name] = data
    state = json.loads(contents[STATE])
    with np.load(io.BytesIO(contents[ARRAYS]), allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    return manifest, state, arrays


def check_embedder(directory: str | Path, fitted_with: str | None, loading_with: str | None) -> None:
    """A router reads queries through the embedder it was fitted with, or not at all."""
    if fitted_with is not None and loading_with is not None and fitted_with != loading_with:
        hint = ""
        runtime = re.match(r"all-MiniLM-L6-v2(?:-(.+))?$", fitted_with)
        if runtime:
            hint = f"set COE_EMBEDDER_RUNTIME={runtime.group(1) or 'torch'} to serve it, or "
        raise CoeError(f"router folder {directory} was fitted on {fitted_with} embeddings, but this process embeds "
                       f"queries with {loading_with}", f"{hint}refit the router with this embedder")
