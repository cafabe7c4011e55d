# make demo: set up .venv and run the whole system on the embedded demo dataset (CPU is enough).
# make test: set up .venv and run the test suite; make lint: ruff's checks and formatting.
# make motion-demo: the motion task (direction of motion only): TSM learns it, TSN stays at chance.
# GPU=cu126 (or cu129) installs Paddle's CUDA 12.6 (12.9) GPU build from Paddle's own package index
# with DALI for CUDA 12, e.g. `make demo GPU=cu126` (docs/gpu.md "Driver": the driver each one needs);
# EXTRAS=gpu,trt,dev,onnx,vdl adds TensorRT's runtime for predict --tensorrt (docs/gpu.md).
PYTHON ?= python3
comma := ,
GPU ?=
GPU_LINES := cu126 cu129
ifeq ($(GPU),)
EXTRAS ?= cpu,dev,onnx,vdl
else
ifeq ($(filter $(GPU),$(GPU_LINES)),)
$(error GPU=$(GPU) is not a CUDA line we install; use one of: $(GPU_LINES) (docs/gpu.md "Install"))
endif
EXTRAS ?= gpu,dev,onnx,vdl
PIP_INDEX := --extra-index-url https://www.paddlepaddle.org.cn/packages/stable/$(GPU)/
endif
ifneq ($(filter gpu trt,$(subst $(comma), ,$(EXTRAS))),)
ifeq ($(GPU),)
$(error EXTRAS=$(EXTRAS) asks for the GPU build: say which CUDA line with GPU=cu126 or GPU=cu129 instead)
endif
endif
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))$(if $(GPU),-$(GPU))
DEMO := data/demo
MOTION := data/motion
NPROC ?= 2  # ffmpeg processes of the conversions; run_dist.sh picks its ranks (one per GPU, else 2)

.PHONY: setup demo motion-demo motion-distill test lint clean-demo

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# the CPU and GPU wheels both install the package `paddle`: only one of them may stay
	@$(PY) -m pip uninstall -q -y $(if $(GPU),paddlepaddle,paddlepaddle-gpu) 2>/dev/null || true
	$(PY) -m pip install -q $(PIP_INDEX) -e ".[$(EXTRAS)]"
	@touch $@

demo: $(STAMP)
	@date +%s > $(VENV)/.demo-start
	$(PY) preprocessing/make_demo_dataset.py $(DEMO)
	$(PY) preprocessing/generate_label.py $(DEMO)/kinetics_demo_train.csv $(DEMO)/label.txt
	$(PY) preprocessing/video2pkl.py $(DEMO)/kinetics_demo_train.csv $(DEMO)/train $(DEMO)/train_pkl $(NPROC) --label-file $(DEMO)/label.txt
	$(PY) preprocessing/video2pkl.py $(DEMO)/kinetics_demo_val.csv $(DEMO)/val $(DEMO)/val_pkl $(NPROC) --label-file $(DEMO)/label.txt
	bash run_dist.sh train TSN configs/tsn_demo.yaml
	bash run_dist.sh eval TSN configs/tsn_demo.yaml
	bash run_dist.sh predict TSN configs/tsn_demo.yaml --input "$$(ls $(DEMO)/val/*/*.mp4 | head -n 1)"
	@$(PY) trainer/main.py summary -c configs/tsn_demo.yaml
	@echo "demo: make demo took $$(( $$(date +%s) - $$(cat $(VENV)/.demo-start) ))s in all"

motion-demo: $(STAMP)
	$(PY) preprocessing/make_demo_dataset.py $(MOTION) --task motion --train-per-class 48 --val-per-class 48
	$(PY) preprocessing/generate_label.py $(MOTION)/kinetics_demo_train.csv $(MOTION)/label.txt
	$(PY) preprocessing/video2pkl.py $(MOTION)/kinetics_demo_train.csv $(MOTION)/train $(MOTION)/train_pkl $(NPROC) --label-file $(MOTION)/label.txt
	$(PY) preprocessing/video2pkl.py $(MOTION)/kinetics_demo_val.csv $(MOTION)/val $(MOTION)/val_pkl $(NPROC) --label-file $(MOTION)/label.txt
	bash run_dist.sh train TSM configs/tsm_motion_demo.yaml
	bash run_dist.sh train TSN configs/tsn_motion_demo.yaml
	@echo "motion-demo (direction of motion, 2 classes, chance 0.5):"
	@printf '  TSM: '; $(PY) trainer/main.py summary -c configs/tsm_motion_demo.yaml | head -n 1
	@printf '  TSN: '; $(PY) trainer/main.py summary -c configs/tsn_motion_demo.yaml | head -n 1

# PP-TSMv2 (narrow) on the motion task, alone and distilled from motion-demo's TSM, at the same budget
motion-distill: $(STAMP)
	@test -f output/motion_tsm/best.pdparams || $(MAKE) motion-demo
	bash run_dist.sh train PP-TSMv2 configs/pptsmv2_motion_distill.yaml -o DISTILL.mode=none -o output_dir=output/motion_pptsmv2
	bash run_dist.sh train PP-TSMv2 configs/pptsmv2_motion_distill.yaml
	@echo "motion-distill (direction of motion, 2 classes, chance 0.5), PP-TSMv2 student:"
	@printf '  alone:               '; $(PY) trainer/main.py summary -c configs/pptsmv2_motion_distill.yaml -o output_dir=output/motion_pptsmv2 | head -n 1
	@printf '  distilled from TSM:  '; $(PY) trainer/main.py summary -c configs/pptsmv2_motion_distill.yaml | head -n 1

test: $(STAMP)
	$(PY) -m pytest tests

# ruff's lint rules and formatting (pyproject.toml); `$(VENV)/bin/ruff format .` applies the formatting
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf $(DEMO) $(MOTION) output/demo output/motion_tsm output/motion_tsn output/motion_pptsmv2 output/motion_pptsmv2_distill log
