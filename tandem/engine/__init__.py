"""Generation and evaluation on any transformers causal LM.

sampling: SamplingParams and Sampler; stops: streaming detokenization and stop
strings; generate: prefill_and_generate; perplexity: llama-perplexity's measure.
"""
