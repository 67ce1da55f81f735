"""Teachers users already have: published teacher sets by name (``gapkd teachers list|fetch|import``,
``zoo:SET/NAME`` references), teachers trained at another input size or normalisation
(``teacher.input``) and Hugging Face image classifiers (``teacher.hf``). See docs/teachers.md."""
from .catalogue import CATALOGUE, TeacherFile, TeacherSet, parse_reference
from .store import TeacherError, fetch, install, resolve, store_root

__all__ = ["CATALOGUE", "TeacherFile", "TeacherSet", "TeacherError", "fetch", "install", "parse_reference", "resolve", "store_root"]
