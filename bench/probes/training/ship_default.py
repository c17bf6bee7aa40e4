"""Write a training run's adapter into ``gircse/default_adapter/`` as the shipped default model (fp16).

    python bench/probes/training/ship_default.py RUN_DIR     (run from anywhere)

The LoRA tensors are stored in fp16 (half the size of the run's fp32 save; the model upcasts them to its
own dtype on load), the adapter's base model path becomes the embedded model's name (``smollm2-135m``)
instead of the training machine's site-packages path, and the GIRCSE config is the run's own.
"""
import json
import os
import sys

from safetensors.torch import load_file, save_file

BASE_MODEL = "smollm2-135m"
DEST = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 3, "gircse",
                                    "default_adapter"))


def main(run_dir: str) -> None:
    gircse_config = json.load(open(os.path.join(run_dir, "gircse_config.json")))
    if not gircse_config.get("adapter") or gircse_config.get("base_model") != BASE_MODEL:
        raise SystemExit(f"{run_dir}: expected an adapter run on {BASE_MODEL}, got {gircse_config}")
    adapter_config = json.load(open(os.path.join(run_dir, "adapter_config.json")))
    adapter_config["base_model_name_or_path"] = BASE_MODEL
    if isinstance(adapter_config.get("target_modules"), list):  # peft saves a set: its order varies per run
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    tensors = {name: t.half().contiguous() for name, t in
               load_file(os.path.join(run_dir, "adapter_model.safetensors")).items()}
    os.makedirs(DEST, exist_ok=True)
    save_file(tensors, os.path.join(DEST, "adapter_model.safetensors"), metadata={"format": "pt"})
    for name, config in (("adapter_config.json", adapter_config), ("gircse_config.json", gircse_config)):
        with open(os.path.join(DEST, name), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    print(f"{DEST}: {len(tensors)} fp16 tensors from {run_dir}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    main(sys.argv[1])
