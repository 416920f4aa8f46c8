"""Limits and names of the synthetic dataset's arguments, in a module light enough for the CLI to check them before it
imports numpy, torch or PyAV (bad usage then exits 2 at once)."""

from collections.abc import Collection, Sequence

from kinema.errors import KinemaError

SYNTH_KIND = "synth_dataset"  # kind in the output manifest (kinema.fileio)
MAX_SIZE = 1024
MAX_FRAMES = 1024
MAX_CLIP_BYTES = 4 * 2**30
# The world's names (kinema.data.synth holds the colours' RGB values and the words captions use for them).
COLOUR_NAMES = ("red", "green", "blue", "yellow", "white", "purple", "orange", "cyan")
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "grow", "shrink", "rotate_cw", "rotate_ccw", "still")


def clip_memory_bytes(frames: int, size: int) -> int:
    """Peak memory of rendering one clip: measured at about 4 bytes per output value (F x size x size x 3)."""
    return 4 * frames * size * size * 3


def check_synth_args(frames: int, size: int, image_fraction: float) -> None:
    """Raise `KinemaError` for sizes the renderer or the later models cannot use, or that would not fit in memory."""
    if frames < 2:
        raise KinemaError(f"a synthetic clip needs at least 2 frames to show motion, got {frames}")
    if size < 16 or size % 16:
        raise KinemaError(f"size must be a positive multiple of 16 (VAE downsampling x8, then 2x2 patches), "
                          f"got {size}; try {max(16, -(-size // 16) * 16)}")
    if size > MAX_SIZE or frames > MAX_FRAMES:
        raise KinemaError(f"{frames} frames of {size}x{size} is past the synthetic clips' limits of size <= "
                          f"{MAX_SIZE} and frames <= {MAX_FRAMES} (training clips are usually 16 frames of 64-256 px)")
    need = clip_memory_bytes(frames, size)
    if need > MAX_CLIP_BYTES:
        raise KinemaError(f"{frames} frames of {size}x{size} would need about {need / 2**30:.1f} GiB per clip while "
                          f"rendering, over the limit of {MAX_CLIP_BYTES // 2**30} GiB; make fewer frames or smaller "
                          "clips (training clips are usually 16 frames of 64-256 px)")
    if not 0.0 <= image_fraction <= 1.0:
        raise KinemaError(f"image_fraction must be between 0 and 1, got {image_fraction}")


def check_combinations(combinations: Collection[Sequence[str]]) -> list[tuple[str, str, str]]:
    """`(colour, shape, motion)` triples checked against the synth world's names (one KinemaError naming the bad
    one and the known names)."""
    checked = []
    for combo in combinations:
        if len(combo) != 3:
            raise KinemaError(f"a held-out combination is colour:shape:motion, got {':'.join(combo)!r}")
        colour, shape, motion = combo
        names = ((colour, COLOUR_NAMES, "colour"), (shape, SHAPES, "shape"), (motion, MOTIONS, "motion"))
        for name, known, what in names:
            if name not in known:
                raise KinemaError(f"unknown {what} {name!r} in {':'.join(combo)}; known: {', '.join(known)}")
        if shape == "circle" and motion.startswith("rotate"):
            raise KinemaError(f"{':'.join(combo)} holds nothing out: the synthetic world never rotates circles (a "
                              "turning circle looks still); hold out a square or triangle, or another motion")
        checked.append((colour, shape, motion))
    drawable = {(colour, shape, motion) for colour in COLOUR_NAMES for shape in SHAPES for motion in MOTIONS
                if not (shape == "circle" and motion.startswith("rotate"))}
    if drawable <= set(checked):
        raise KinemaError("the held-out combinations are every colour, shape and motion the synthetic world has, so "
                          "no video could be drawn; hold out fewer")
    return checked

SETTINGS_NAME = "synth.json"  # settings of the whole set
