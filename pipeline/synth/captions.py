"""Alt-text-like captions: many templates and phrasings, with the noise web captions carry.

A correct caption names the image's class (or a synonym) and some of its attributes. Defective captions: another
class's caption (mismatch), another language (:func:`foreign`), gibberish, too short (:func:`short`: at most 2 words
/ 5 characters, DataComp's basic-filter boundary), uninformative (:func:`uninformative`: true of any image, naming
no class and no attribute, mostly long enough to pass that boundary), and a boilerplate cluster's one template
with a stock number (:func:`boilerplate`).
"""

from __future__ import annotations

import numpy as np

SYNONYMS = {
    "circle": ["circle", "round disc", "disc"],
    "square": ["square", "square tile", "square block"],
    "triangle": ["triangle", "triangular shape", "triangle sign"],
    "star": ["star", "five-pointed star", "star shape"],
    "cross": ["cross", "plus sign", "cross symbol"],
    "ring": ["ring", "donut shape", "hollow ring"],
    "heart": ["heart", "heart shape", "love heart"],
    "crescent": ["crescent", "crescent moon", "moon shape"],
    "arrow": ["arrow", "arrow sign", "pointing arrow"],
    "hourglass": ["hourglass", "sand timer", "hourglass shape"],
    "house": ["house", "house icon", "little house"],
    "bolt": ["lightning bolt", "bolt", "thunderbolt"],
}
TEXTURE_WORDS = {
    "plain": ["plain", "solid", "flat"], "striped": ["striped", "with stripes", "stripy"],
    "dotted": ["dotted", "polka dot", "spotted"], "checkered": ["checkered", "chequered", "checkerboard"],
    "speckled": ["speckled", "grainy", "noisy"], "wavy": ["wavy", "with wavy lines", "rippled"],
    "gradient": ["gradient", "shaded", "fading"],
}
TEMPLATES = [
    "a photo of a {adj}{cls}", "a {adj}{cls}", "close-up of a {adj}{cls} on a background", "Buy {adj}{cls} wall decal",
    "IMG_{num} {adj}{cls}", "vector illustration of a {adj}{cls}", "{adj}{cls} pattern",
    "my favourite {adj}{cls} ever!!!", "the {adj}{cls} on my desk", "{adj}{cls} sticker for laptops", "{Adj}{cls} icon",
    "hand drawn {adj}{cls}", "stock image: {adj}{cls} on noisy background", "{Adj}{cls} - HD wallpaper",
    "a {adj}{cls}, slightly rotated",
    "cute {adj}{cls} clipart free download", "picture of one {adj}{cls} shape", "{Adj}{cls} logo design template",
    "a {adj}{cls} printed on paper", "my kid drew this {adj}{cls} lol", "{adj}{cls} emoji png",
    "minimal {adj}{cls} art print", "photo: a {adj}{cls} seen from above", "a drawing of a {adj}{cls}",
    "an image of the {adj}{cls}",
]
#: How often a caption carries one attribute word, and which: web alt-text names the object far more reliably
#: than its colour or pattern, so the class word is the caption's dominant signal.
ATTRIBUTE_P = {"color": 0.35, "texture": 0.15, "size": 0.1}
CANONICAL_P = 0.7  # the class's own name; otherwise one of its synonyms
SUFFIXES = ["", "", "", "", " | stock photo", " - free download", " &amp; more", " [HD]", " ...", " (2019)",
            " | Shutterstock", " #art", " 1080p", " - Pinterest"]

FOREIGN = {
    "es": ("una foto de un {cls} {color}", "{cls} {color} con textura", "pegatina de {cls} en color {color}"),
    "fr": ("une photo d'un {cls} {color}", "{cls} {color} avec motif", "autocollant {cls} couleur {color}"),
    "de": ("ein Foto von einem {color} {cls}", "{color} {cls} mit Muster", "Aufkleber {cls} in der Farbe {color}"),
}
FOREIGN_WORDS = {
    "es": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella", "cross": "cruz",
           "ring": "anillo", "heart": "corazón", "crescent": "media luna", "arrow": "flecha",
           "hourglass": "reloj de arena", "house": "casa", "bolt": "rayo", "red": "rojo", "green": "verde",
           "blue": "azul", "yellow": "amarillo", "orange": "naranja", "purple": "morado", "pink": "rosa",
           "black": "negro", "white": "blanco",
           "brown": "marrón", "gray": "gris", "cyan": "cian"},
    "fr": {"circle": "cercle", "square": "carré", "triangle": "triangle", "star": "étoile", "cross": "croix",
           "ring": "anneau", "heart": "cœur", "crescent": "croissant de lune", "arrow": "flèche",
           "hourglass": "sablier", "house": "maison", "bolt": "éclair", "red": "rouge", "green": "vert",
           "blue": "bleu", "yellow": "jaune", "orange": "orange", "purple": "violet", "pink": "rose",
           "black": "noir", "white": "blanc", "brown": "marron", "gray": "gris", "cyan": "cyan"},
    "de": {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern", "cross": "Kreuz",
           "ring": "Ring", "heart": "Herz", "crescent": "Halbmond", "arrow": "Pfeil", "hourglass": "Sanduhr",
           "house": "Haus", "bolt": "Blitz", "red": "roten", "green": "grünen", "blue": "blauen",
           "yellow": "gelben", "orange": "orangen", "purple": "lila", "pink": "rosa", "black": "schwarzen",
           "white": "weißen", "brown": "braunen", "gray": "grauen", "cyan": "türkisen"},
}
SHORT = ["img", "photo", "image", "DSC0042", "{cls}", "untitled", "IMG_{num}", "pic", "{color}"]
#: Alt-text a CMS, a camera or a link writes: correct for any image and naming nothing in it (no class, synonym,
#: colour or texture word, not even inside another word: tests/test_synth.py checks every expansion).
UNINFORMATIVE = ["image", "photo {num}", "click here", "{file}", "click here to enlarge", "image {num} of {total}",
                 "photo uploaded by user{num}", "view full size image", "no description available",
                 "thumbnail for post {num}", "{file} (uploaded file)", "see more photos on our website",
                 "picture {num} from the gallery", "untitled image {num}", "product image {num}", "main image",
                 "header image for this post", "default image placeholder", "enlarge this image", "{file} - view"]
FILES = ["IMG_{num}.jpg", "DSC_{num}.JPG", "image_{num}.jpeg", "untitled-{total}.png", "photo-{num}.webp",
         "Screen Shot 2019-0{total}-12 at 10.41.22.png", "{hex}.jpg"]
STOCK = [" #{num}", " ({num})", " - {num}", " | ID {num}", " No. {num}"]
_CONSONANTS = "bcdfghjklmnpqrstvwxz"


def caption(rng: np.random.Generator, cls: str, color: str, texture: str, scale: float) -> str:
    """A correct English caption for an image of ``cls``: its name (or a synonym), at most one attribute."""
    names = SYNONYMS[cls]
    name = names[0] if rng.random() < CANONICAL_P else str(rng.choice(names[1:]))
    kinds = list(ATTRIBUTE_P)
    probs = np.array([*ATTRIBUTE_P.values(), 1 - sum(ATTRIBUTE_P.values())])
    kind = ([*kinds, "none"])[int(rng.choice(len(probs), p=probs))]
    adj = {"color": color, "texture": str(rng.choice(TEXTURE_WORDS[texture])),
           "size": "small" if scale < 0.36 else "large", "none": ""}[kind]
    adj = adj + " " if adj else ""
    template = str(rng.choice(TEMPLATES))
    cls = name if adj or "{Adj}" not in template else name.capitalize()
    text = template.format(adj=adj, Adj=adj.capitalize(), cls=cls,
                           num=int(rng.integers(1000, 9999)))
    text += str(rng.choice(SUFFIXES))
    if rng.random() < 0.1:
        text = text.upper()
    elif rng.random() < 0.1:
        text = text.lower()
    return text


def foreign(rng: np.random.Generator, cls: str, color: str) -> tuple[str, str]:
    lang = str(rng.choice(sorted(FOREIGN)))
    words = FOREIGN_WORDS[lang]
    return str(rng.choice(FOREIGN[lang])).format(cls=words[cls], color=words[color]), lang


def gibberish(rng: np.random.Generator) -> str:
    words = []
    for _ in range(int(rng.integers(3, 8))):
        n = int(rng.integers(3, 9))
        words.append("".join(rng.choice(list(_CONSONANTS), n)))
    return " ".join(words)


def uninformative(rng: np.random.Generator) -> str:
    """Alt-text that is true of the image but says nothing about it: "click here to enlarge", a file name, ..."""
    num, total = int(rng.integers(10, 9999)), int(rng.integers(2, 10))
    file = str(rng.choice(FILES)).format(num=num, total=total, hex=rng.bytes(6).hex())
    return str(rng.choice(UNINFORMATIVE)).format(num=num, total=total, file=file)


def boilerplate(rng: np.random.Generator, template: str) -> str:
    """A boilerplate cluster member's caption: the cluster's caption with a stock number of its own."""
    return template + str(rng.choice(STOCK)).format(num=int(rng.integers(1000, 99999)))


def short(rng: np.random.Generator, cls: str, color: str) -> str:
    """One word: fails DataComp's basic rule (more than 2 words and more than 5 characters)."""
    return str(rng.choice(SHORT)).format(cls=cls, color=color, num=int(rng.integers(10, 99)))
