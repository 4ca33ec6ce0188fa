"""Causal LMs transformers builds only inside a multimodal model, and no other text model computes.

Step3-VL's (`step3p7`) language model, `Step3p7TextModel` (model_type `step3p5`: sigmoid-gated attention heads,
per-layer head counts, clamped SwiGLU experts with a shared expert and a biased router), has no causal LM
class and no transformers text model equals it. `Step3p7TextForCausalLM` is the smallest one that does: the
multimodal model's own text model and LM head, so on text it runs the very modules
`Step3p7ForConditionalGeneration` runs (tests/test_vision_language.py checks the logits bit for bit).
`register(model_type)` makes AutoModelForCausalLM build it from the text config, as it builds any other causal LM.
"""

from __future__ import annotations

import functools

from torch import nn


def _step3p7_causal_lm():
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.step3p7 import modeling_step3p7 as m

    class Step3p7TextForCausalLM(m.Step3p7PreTrainedModel):
        """Step3p7TextModel + LM head, under the names Step3-VL's release keeps them (`model.layers.*`, `lm_head`)."""

        config_class = m.Step3p7TextConfig
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

        def __init__(self, config):
            super().__init__(config)
            self.model = m.Step3p7TextModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                    use_cache=False, **kwargs) -> CausalLMOutputWithPast:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state))

    return m.Step3p7TextConfig, Step3p7TextForCausalLM


# model_type -> why no student is seeded from it (kd/student.py refuses it as the primary teacher unless the
# student comes from --student-config): the student is the primary's architecture, pruned, and is released as
# an HF folder for AutoModelForCausalLM, which cannot build these outside Nexus. Step3-VL's per-layer lists
# (head counts, MLP types, clamps) would also have to follow the kept layers.
NO_STUDENT = {"step3p5": "transformers has no causal LM class for Step3-VL's language model (step3p5), so a "
                         "student of that architecture could not be loaded outside Nexus"}


# model_type of the language model -> its causal LM (config class, model class), built on first use: importing
# transformers' Step3-VL modelling takes seconds, which no other teacher should pay.
CAUSAL_LM = {"step3p5": _step3p7_causal_lm}


@functools.cache
def register(model_type: str) -> None:
    """Let AutoModelForCausalLM build the causal LM CAUSAL_LM names for this model type (once per process)."""
    from transformers import AutoModelForCausalLM

    config_cls, model_cls = CAUSAL_LM[model_type]()
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
