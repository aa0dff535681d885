"""Alt-text-like captions: many templates and phrasings, with the noise web captions carry.

A correct caption names the image's class (or a synonym) and some of its attributes. Defective captions are
drawn by :func:`defective_caption`: another class's caption (mismatch), another language, gibberish, or too
short (at most 2 words / 5 characters, DataComp's basic-filter boundary).
"""

from __future__ import annotations

import numpy as np

SYNONYMS = {
    "circle": ["circle", "round disc", "circle shape", "dot"],
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
    "a photo of a {color} {cls}", "a {texture} {color} {cls}", "{color} {cls} with a {texture} pattern",
    "close-up of a {size} {cls} on a cluttered background", "Buy {color} {cls} wall decal | free shipping",
    "IMG_{num} {color} {cls}", "vector illustration of a {texture} {cls}", "{cls} pattern, {texture}, {color}",
    "my favourite {cls} ever!!! #{tag} #{color}", "the {cls} is {color} and {texture}",
    "{size} {color} {cls} sticker for laptops", "{Cls} icon in {color}", "hand drawn {cls} in {color} ink",
    "stock image: {texture} {cls} on noisy background", "{color} {cls} - HD wallpaper",
    "a {size} {cls}, slightly rotated", "{Cls} ({color}, {texture})", "cute {color} {cls} clipart free download",
    "picture of one {cls} shape in {color}", "{texture} {cls} logo design template",
    "a {color} colored {cls} printed on paper", "my kid drew this {cls} lol", "{color} {cls} emoji png",
    "minimal {cls} art print, {color} on background", "photo: a {texture} {cls} seen from above",
]
SUFFIXES = ["", "", "", "", " | stock photo", " - free download", " &amp; more", " [HD]", " ...", " (2019)",
            " | Shutterstock", " #art", " 1080p", " - Pinterest"]

FOREIGN = {
    "es": ("una foto de un {cls} {color}", "{cls} {color} con textura", "pegatina de {cls} en color {color}"),
    "fr": ("une photo d'un {cls} {color}", "{cls} {color} avec motif", "autocollant {cls} couleur {color}"),
    "de": ("ein Foto von einem {color} {cls}", "{color} {cls} mit Muster", "Aufkleber {cls} in der Farbe {color}"),
}
FOREIGN_WORDS = {
    "es": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella", "cross": "cruz",
           "ring": "anillo", "heart": "corazón", "crescent": "media luna", "arrow": "flecha", "hourglass": "reloj de arena",
           "house": "casa", "bolt": "rayo", "red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo",
           "orange": "naranja", "purple": "morado", "pink": "rosa", "black": "negro", "white": "blanco",
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
_CONSONANTS = "bcdfghjklmnpqrstvwxz"


def caption(rng: np.random.Generator, cls: str, color: str, texture: str, scale: float) -> str:
    """A correct English caption for an image of ``cls``."""
    name = str(rng.choice(SYNONYMS[cls]))
    text = str(rng.choice(TEMPLATES)).format(
        cls=name, Cls=name.capitalize(), color=color, texture=str(rng.choice(TEXTURE_WORDS[texture])),
        size="small" if scale < 0.33 else "large", num=int(rng.integers(1000, 9999)), tag=cls)
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


def short(rng: np.random.Generator, cls: str, color: str) -> str:
    """One word: fails DataComp's basic rule (more than 2 words and more than 5 characters)."""
    return str(rng.choice(SHORT)).format(cls=cls, color=color, num=int(rng.integers(10, 99)))
