# make demo: set up .venv and run the whole system on the embedded demo dataset (CPU is enough).
# make test: set up .venv and run the test suite.
# EXTRAS=gpu,dev,onnx,vdl selects the GPU wheels of Paddle (paddlepaddle-gpu) instead of the CPU ones.
PYTHON ?= python3
EXTRAS ?= cpu,dev,onnx,vdl
VENV := .venv
PY := $(VENV)/bin/python
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEMO := data/demo
NPROC ?= 2

.PHONY: setup demo test clean-demo

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

demo: $(STAMP)
	@date +%s > $(VENV)/.demo-start
	$(PY) preprocessing/make_demo_dataset.py $(DEMO)
	$(PY) preprocessing/generate_label.py $(DEMO)/kinetics_demo_train.csv $(DEMO)/label.txt
	$(PY) preprocessing/video2pkl.py $(DEMO)/kinetics_demo_train.csv $(DEMO)/train $(DEMO)/train_pkl $(NPROC) --label-file $(DEMO)/label.txt
	$(PY) preprocessing/video2pkl.py $(DEMO)/kinetics_demo_val.csv $(DEMO)/val $(DEMO)/val_pkl $(NPROC) --label-file $(DEMO)/label.txt
	bash run_dist.sh train TSN configs/tsn_demo.yaml --nproc $(NPROC)
	bash run_dist.sh eval TSN configs/tsn_demo.yaml --nproc $(NPROC)
	bash run_dist.sh predict TSN configs/tsn_demo.yaml --input "$$(ls $(DEMO)/val/*/*.mp4 | head -n 1)"
	@$(PY) trainer/main.py summary -c configs/tsn_demo.yaml
	@echo "demo: make demo took $$(( $$(date +%s) - $$(cat $(VENV)/.demo-start) ))s in all"

test: $(STAMP)
	$(PY) -m pytest tests

clean-demo:
	rm -rf $(DEMO) output/demo log
