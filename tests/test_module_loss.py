"""BillaLM's loss equals transformers' own causal-LM loss, while lm_head only runs where labels exist."""

from __future__ import annotations

import torch

from billa.model.module import BillaLM

ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def _module() -> BillaLM:
    torch.manual_seed(0)
    module = BillaLM(
        model={"architecture": ARCH, "pretrained_path": None}, vocab_size=97, optimizer={}, scheduler={}, total_steps=1
    )
    module.configure_model()
    return module


def test_loss_and_gradients_equal_hf_loss_with_masked_labels():
    module = _module()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 97, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0  # padding
    labels = input_ids.clone()
    labels[:, :5] = -100  # a prompt / the part before a conditional-generation cut
    labels[attention_mask == 0] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    ours = module.model_step(batch)
    ours.backward()
    ours_grad = module.model.lm_head.weight.grad.clone()
    module.model.zero_grad()
    reference = module.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad, module.model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_batch_without_targets_is_zero_not_nan():
    module = _module()
    input_ids = torch.randint(3, 97, (2, 6))
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.full_like(input_ids, -100),
    }
    loss = module.model_step(batch)
    assert loss.item() == 0.0
    loss.backward()  # the graph is intact
