"""4-bit weights on a CPU: a no-grad evaluation pass (scoring before training, the loss's head-split probe) must not
change the gradients that training then computes (bitsandbytes repacks 4-bit layers for an inference kernel with
no backward on CPUs with AVX512-BF16; hfbridge turns that layout off for every 4-bit model it loads)."""

import pytest
import torch

from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, LoRA


def _lora_grads(tiny_model_dir, chat_data, evaluate_first: bool, reference: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), load_in_4bit=True,
                                    model_transform=LoRA(r=4, dropout=0.0))
    module.configure_model()
    if reference:  # bitsandbytes' CPU inference layout off, by hand: the gradients as they must be
        for layer in module.model.modules():
            if hasattr(layer, "support_avx512bf16_for_cpu"):
                layer.support_avx512bf16_for_cpu = False
    for name, p in module.model.named_parameters():  # lora_B starts at zero: give every adapter a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    dm = CausalLMDataModule(module.tokenizer, chat_data, batch_size=4)
    dm.setup()
    batch = dm.collator(dm.train_samples[:4])
    if evaluate_first:
        module.model.eval()
        with torch.no_grad():
            module.forward(batch)
        module.model.train()
    module.training_step(batch).backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if "lora_" in n}


def test_an_evaluation_pass_does_not_change_4bit_lora_gradients(tiny_model_dir, chat_data):
    pytest.importorskip("bitsandbytes")
    fresh = _lora_grads(tiny_model_dir, chat_data, evaluate_first=False, reference=True)
    after_eval = _lora_grads(tiny_model_dir, chat_data, evaluate_first=True)
    assert fresh.keys() == after_eval.keys() and len(fresh) > 0
    for name in fresh:
        assert fresh[name].abs().sum() > 0, name
        torch.testing.assert_close(after_eval[name], fresh[name], atol=1e-6, rtol=1e-4, msg=name)
