"""Distributed training: DeepSpeed strategies (incl. CPU ZeRO-3), memory plan, checkpoint discovery."""
