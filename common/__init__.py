"""Code shared by the jobs and the server: config, data, chat templates, model loading.

Importing `common` registers our ChatGLM-6B model and the ChatGLM tokenizers with transformers'
Auto classes, so folders written by `jobs/convert.py` load with `AutoModelForCausalLM` /
`AutoTokenizer` and no `trust_remote_code`.
"""

from common.models.auto import register as _register

_register()
