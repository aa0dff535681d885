"""Detectors run on decoded images, offline from packages Winnow installs: faces and NSFW content.

- **Faces**: ``haar`` (the default), OpenCV's frontal-face Haar cascade (shipped inside opencv-python-headless;
  about 5 ms an image on one core), or ``nudenet``, the face classes of NudeNet's detector (about 60 ms). On
  scikit-image's Labeled Faces in the Wild sample (100 faces and 100 non-faces, 25 px crops upscaled to 100 px
  on a 200 px canvas) the cascade finds 97 of the faces and none of the non-faces, NudeNet 32 and none
  (``benchmarks/bench_safety.py`` measures both). Neither finds faces in profile, small (under 20 px),
  occluded or turned far from the camera: blurring what was detected lowers the exposure of faces, it does not
  remove it.
  Boxes are normalised ``[x0, y0, x1, y1]`` in 0-1, DataComp's ``face_bboxes`` format.
- **NSFW**: NudeNet's ONNX detector (``nudenet/320n.onnx``, run by onnxruntime): the score of an image is the
  highest confidence among its *exposed* classes (:data:`EXPOSED`), 0 when none is found. It detects nudity, not
  violence, gore or other harmful content.

A :class:`Detector` is made once per process (:func:`detector`) and is safe to call from several threads.
"""

from __future__ import annotations

import os
import threading

import numpy as np

FACE_MODELS = ("haar", "nudenet")
EXPOSED = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
           "ANUS_EXPOSED")
FACES = ("FACE_FEMALE", "FACE_MALE")
MIN_FACE = 20  # px: the smallest face the Haar cascade looks for


class _Haar:
    """OpenCV's frontal face cascade; one classifier per thread (OpenCV's cascades keep state while detecting)."""

    def __init__(self) -> None:
        import cv2

        self.cv2 = cv2
        self.path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        self._local = threading.local()

    def __call__(self, rgb: np.ndarray) -> list[list[float]]:
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = self._local.cascade = self.cv2.CascadeClassifier(self.path)
        gray = self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(MIN_FACE, MIN_FACE))
        return [[float(x / w), float(y / h), float((x + bw) / w), float((y + bh) / h)]
                for x, y, bw, bh in (found if len(found) else [])]


class _NudeNet:
    """NudeNet's detector with a one-thread onnxruntime session (the Dask worker owns the cores)."""

    def __init__(self) -> None:
        import nudenet
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.detector = nudenet.NudeDetector()
        self.detector.onnx_session = onnxruntime.InferenceSession(
            os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx"), sess_options=options,
            providers=["CPUExecutionProvider"])

    def __call__(self, rgb: np.ndarray) -> list[dict]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # as cv2.imread gives it, which the detector expects
        return self.detector.detect(bgr)


class Detector:
    """``detect(rgb)`` -> ``{"face_bboxes": [...], "nsfw": float}`` for the detectors asked for."""

    def __init__(self, names: tuple[str, ...], face_model: str = "haar"):
        unknown = set(names) - {"faces", "nsfw"}
        if unknown:
            raise ValueError(f"unknown detector {sorted(unknown)[0]!r}; choose faces, nsfw")
        self.names, self.face_model = tuple(names), face_model
        self._haar = _Haar() if "faces" in names and face_model == "haar" else None
        needs_nudenet = "nsfw" in names or ("faces" in names and face_model == "nudenet")
        self._nudenet = _NudeNet() if needs_nudenet else None

    def __call__(self, rgb: np.ndarray) -> dict:
        out: dict = {}
        found = self._nudenet(rgb) if self._nudenet is not None else []
        if "nsfw" in self.names:
            out["nsfw"] = max([float(d["score"]) for d in found if d["class"] in EXPOSED], default=0.0)
        if "faces" in self.names:
            if self._haar is not None:
                out["face_bboxes"] = self._haar(rgb)
            else:
                h, w = rgb.shape[:2]
                out["face_bboxes"] = [[x / w, y / h, (x + bw) / w, (y + bh) / h]
                                      for x, y, bw, bh in (d["box"] for d in found if d["class"] in FACES)]
        return out


_DETECTORS: dict = {}
_LOCK = threading.Lock()


def detector(names, face_model: str = "haar") -> Detector | None:
    """The process's detector for ``names`` (None when none is asked for)."""
    names = tuple(sorted(set(names or ())))
    if not names:
        return None
    with _LOCK:
        key = (names, face_model)
        if key not in _DETECTORS:
            _DETECTORS[key] = Detector(names, face_model)
        return _DETECTORS[key]
