"""Code shared by the jobs and the server: config, data, chat templates, model loading.

Importing `common` itself is cheap (no torch, no transformers): Serve's controller, proxy and HTTP front end
import `common.config` and start without them. `import common.models` (done by every module under it, so by the
loader) registers our ChatGLM-6B model and the ChatGLM tokenizers with transformers' Auto classes, so folders
written by `jobs/convert.py` load with `AutoModelForCausalLM` / `AutoTokenizer` and no `trust_remote_code`.
"""
