import sys, torch, transformers
sys.path.insert(0, '/work/main')
from pathlib import Path
from ferrum_compiler.frontend import open_source
dest = Path('/tmp/moe/hf')
torch.manual_seed(0)
# a Qwen3-30B-A3B-like MoE, scaled down: every width a multiple of 256 (GGUF super-blocks)
cfg = transformers.Qwen3MoeConfig(vocab_size=49152, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=256,
                                  num_experts=32, num_experts_per_tok=4, num_hidden_layers=8, num_attention_heads=16,
                                  num_key_value_heads=4, head_dim=128, max_position_embeddings=4096, norm_topk_prob=True,
                                  tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6, decoder_sparse_step=1,
                                  mlp_only_layers=[])
m = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(dest)
open_source("smollm2").write_tokenizer(dest)
print(sum(p.numel() for p in m.parameters())/1e6, "M params")
