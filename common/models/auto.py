"""Register our ChatGLM classes with transformers' Auto classes (done by `import common.models`)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

_done = False


class _ChatGLMTokenizerKey(PretrainedConfig):
    """Only a key for AutoTokenizer.register: ChatGLM2/3 converted folders are native GLM models whose
    tokenizer_config.json names `ChatGLMTokenizer`; GLM's own tokenizer mapping is left alone."""

    model_type = "glmops-chatglm-tokenizer"


class _ChatGLM4TokenizerKey(PretrainedConfig):
    """The same for converted glm-4-9b-chat folders (`ChatGLM4Tokenizer`)."""

    model_type = "glmops-chatglm4-tokenizer"


def register() -> None:
    global _done
    if _done:
        return
    from common.models.modeling_chatglm1 import ChatGLM1Config, ChatGLM1ForCausalLM, ChatGLM1Model
    from common.models.tokenization_chatglm import ChatGLM1Tokenizer, ChatGLMTokenizer
    from common.models.tokenization_glm4 import ChatGLM4Tokenizer

    AutoConfig.register("chatglm1", ChatGLM1Config, exist_ok=True)
    AutoModel.register(ChatGLM1Config, ChatGLM1Model, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLM1Config, ChatGLM1ForCausalLM, exist_ok=True)
    AutoTokenizer.register(ChatGLM1Config, tokenizer_class=ChatGLM1Tokenizer, exist_ok=True)
    AutoConfig.register(_ChatGLMTokenizerKey.model_type, _ChatGLMTokenizerKey, exist_ok=True)
    AutoTokenizer.register(_ChatGLMTokenizerKey, tokenizer_class=ChatGLMTokenizer, exist_ok=True)
    AutoConfig.register(_ChatGLM4TokenizerKey.model_type, _ChatGLM4TokenizerKey, exist_ok=True)
    AutoTokenizer.register(_ChatGLM4TokenizerKey, tokenizer_class=ChatGLM4Tokenizer, exist_ok=True)
    _done = True
