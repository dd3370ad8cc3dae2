"""The image-to-stylised-video (I2SV) style library of Uniworld-OSP2.0: 12 named styles and their prompt templates.

Uniworld-OSP2.0 conveys the target style through the conditioning text: the caption is wrapped in a style
template, and (optionally, ospfn's addition) learned style tokens are appended to the context
(:func:`ospfn.model.vlm.style_tokens`).  The names are those of the paper, in its order; the index of a name
in :data:`STYLES` is its style id (the row of a style-token table, the label of the dataset format).

Names are matched case-insensitively, ignoring spaces, hyphens and underscores (``"pixel_art"``,
``"Pixel Art"`` and ``"pixel-art"`` are all ``"Pixel art"``); an unknown name raises ``ValueError`` listing
the 12 names.

Example::

    >>> from ospfn.styles import STYLES, style_id, style_prompt
    >>> len(STYLES), STYLES[5]
    (12, 'Pixel art')
    >>> style_id("pixel-art"), style_id("GOTHAM NOIR")
    (5, 9)
    >>> style_prompt("a red circle moving left", "Pixel art")
    'a red circle moving left, in pixel art style: a retro video game sprite made of large square pixels and a small colour palette'
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["STYLES", "STYLE_TEMPLATES", "style_id", "style_name", "style_prompt"]

STYLES: tuple[str, ...] = (
    "Ghibli",
    "3D rendering",
    "Cyberpunk",
    "Ink painting",
    "Oil painting",
    "Pixel art",
    "Vaporwave",
    "Disney",
    "Fairy tale",
    "Gotham noir",
    "Lego",
    "Chibi",
)

# "{prompt}" is replaced by the caption.  The descriptions are ospfn's own wording of what each style looks like.
STYLE_TEMPLATES: dict[str, str] = {
    "Ghibli": "{prompt}, in Ghibli style: a hand-drawn anime film with soft pastel colours and a gentle painted sky",
    "3D rendering": "{prompt}, in 3D rendering style: a shaded computer-generated scene with soft lighting and cast shadows",
    "Cyberpunk": "{prompt}, in cyberpunk style: a dark night scene with glowing neon outlines in magenta and cyan",
    "Ink painting": "{prompt}, in ink painting style: black ink brushwork on pale rice paper",
    "Oil painting": "{prompt}, in oil painting style: thick visible brush strokes and rich colours on canvas",
    "Pixel art": "{prompt}, in pixel art style: a retro video game sprite made of large square pixels and a small colour palette",
    "Vaporwave": "{prompt}, in vaporwave style: a pink and cyan retro gradient with a dreamy 1980s look",
    "Disney": "{prompt}, in Disney style: a bright classic animated film with saturated colours and clean outlines",
    "Fairy tale": "{prompt}, in fairy tale style: a magical storybook night with golden sparkles",
    "Gotham noir": "{prompt}, in Gotham noir style: a high-contrast black and white film noir scene in the dark",
    "Lego": "{prompt}, in Lego style: built from plastic toy bricks with round studs",
    "Chibi": "{prompt}, in chibi style: a cute cartoon with a thick dark outline and candy colours",
}

_KEY = re.compile(r"[\s_\-]+")
_BY_KEY = {_KEY.sub("", name.lower()): i for i, name in enumerate(STYLES)}


def style_id(name: str) -> int:
    """The index of style ``name`` in :data:`STYLES` (case-insensitive; spaces, ``-`` and ``_`` ignored)."""
    if isinstance(name, bool) or not isinstance(name, str):
        raise TypeError(f"style_id: style must be a str naming one of {list(STYLES)}, got {type(name).__name__}")
    i = _BY_KEY.get(_KEY.sub("", name.lower()))
    if i is None:
        raise ValueError(f"style_id: unknown style {name!r}; the 12 styles are: {', '.join(STYLES)}")
    return i


def style_name(style) -> str:
    """The canonical name of a style given by name (any spelling :func:`style_id` accepts) or by id (0..11)."""
    if isinstance(style, int) and not isinstance(style, bool):
        if not 0 <= style < len(STYLES):
            raise ValueError(f"style_name: style id {style} is out of range; allowed: 0..{len(STYLES) - 1} ({', '.join(STYLES)})")
        return STYLES[style]
    return STYLES[style_id(style)]


def style_prompt(prompt: str, style: Optional[str]) -> str:
    """``prompt`` wrapped in the template of ``style`` (``None``: the prompt unchanged)."""
    if not isinstance(prompt, str):
        raise TypeError(f"style_prompt: prompt must be a str, got {type(prompt).__name__}")
    if style is None:
        return prompt
    return STYLE_TEMPLATES[style_name(style)].format(prompt=prompt)
