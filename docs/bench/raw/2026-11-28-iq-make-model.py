import sys, torch, transformers
sys.path.insert(0, '/work/main')
from pathlib import Path
from ferrum_compiler.frontend import open_source
dest = Path('/tmp/q06')
torch.manual_seed(0)
cfg = transformers.Qwen3Config(vocab_size=49152, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                               num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                               tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
m = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(dest)
open_source("smollm2").write_tokenizer(dest)
print(sum(p.numel() for p in m.parameters())/1e6, "M params")
