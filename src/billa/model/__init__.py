"""The LightningModule around LlamaForCausalLM, model builders and the LR schedule."""
