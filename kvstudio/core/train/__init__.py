"""Fine-tune sessions under a cache policy: LoRA trained with the policy's cache in the loop.

  data.py           training examples (token ids + which targets count): documents, local files
                    read with `datasets`, synthetic pass-key tasks; the validation split
  lora.py           LoRA settings, applying peft to a loaded model, atomic adapter saves and loads
  through_cache.py  one example's loss fed chunk by chunk through the engine's PolicyCache, with
                    gradients `through` kept entries or `truncated` at chunk boundaries
  session.py        the training loop: optimizer, warm-up, accumulation, validation under the policy
                    and under `full`, checkpoints, resume, cancel within a step
  log.py            what a session reports as it runs (read by the CLI and the studio's views)
  records.py        sessions in the run history (kind "finetune")
"""
