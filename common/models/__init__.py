"""The ChatGLM family: tokenizers, the ChatGLM-6B model, the v2/v3 mapping onto transformers' GLM, the converter,
the one loader, Auto-class registration, the tiny offline model and the metadata every model folder carries.

Importing this package (or any module in it) registers our classes with transformers' Auto classes."""

from common.models.auto import register as _register

_register()
