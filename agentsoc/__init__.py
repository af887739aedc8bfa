"""agentsoc: multiagent finetuning of language models."""
