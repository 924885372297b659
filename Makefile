# sppnet: `make all` installs and runs the whole pipeline on the embedded dataset; `make test` runs the tests.
# Every stage target is its MANIFEST.json file, so `make` reruns only what is missing; each stage also
# checks its own inputs and config and skips itself when its manifest is up to date.
#
#   make all                                   embedded synthetic dataset, ZF-5 from scratch (CPU minutes)
#   make all RUN=voc DATASET=voc2007 VOC_ROOT=/path/VOCdevkit CONFIG=voc2007-zf5   the paper's setting
#   SPP_FLAGS="--set finetune.iters=500 --device cuda" adds options to every stage
#
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
SPP := $(VENV)/bin/spp
RUN ?= synth
DATASET ?= synth
SYNTH_ROOT ?= data/synth
VOC_ROOT ?= $(if $(filter synth,$(DATASET)),$(SYNTH_ROOT),)
# The preset every stage builds its config from (stages/configs/<name>.toml, or a TOML path).
CONFIG ?= $(if $(filter synth,$(DATASET)),synth,voc2007-zf5)
CONFIG_FILE := $(firstword $(wildcard $(CONFIG) stages/configs/$(CONFIG).toml))
R := data/runs/$(RUN)
ARGS := --run $(RUN) --dataset $(DATASET) $(if $(VOC_ROOT),--voc-root $(VOC_ROOT)) --config $(CONFIG) $(SPP_FLAGS)
# What names the folders comes from the preset itself (stages/core/config.py, stdlib only): the number of scales
# (the all-scales tag s<n>), the backbone, and the train / test splits.
PRESET_FACTS := $(shell PYTHONPATH=. $(PYTHON) -c 'import sys; from stages.core.config import build_config; \
	c = build_config(sys.argv[1]); print(len(c.features.scales), c.model.backbone, c.data.train_split, \
	c.data.test_split)' $(CONFIG))
N_SCALES := $(word 1,$(PRESET_FACTS))
BACKBONE := $(word 2,$(PRESET_FACTS))
TRAIN := $(word 3,$(PRESET_FACTS))
TEST := $(word 4,$(PRESET_FACTS))
# Table 9 rows: SVMs on pool5, fc7 (no fine-tuning; only ZF-5 has pretrained fc layers: an ImageNet trunk's fc
# layers start random), ftfc7, ftfc7 + box regression; at 1 and at all scales. On real data also the fine-tuned
# fc8 softmax as the scorer (beyond the paper), with and without box regression.
SVM_FEATURES := pool5 $(if $(filter zf5,$(BACKBONE)),fc7) ftfc7
SCORERS := $(SVM_FEATURES) $(if $(filter synth,$(DATASET)),,softmax)

.PHONY: install test all pipeline clean-run help
.SECONDARY:
.DEFAULT_GOAL := help

help:
	@echo "make install   create .venv with the pinned, tested packages (no-op when up to date)"
	@echo "make test      run the test suite"
	@echo "make all       generate the embedded dataset and run every stage; prints the Table 9 rows"

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.lock
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: install
	$(VENV)/bin/python -m pytest -q

# Independent stages run side by side, one per core with one thread each: much of every stage is single-threaded
# Python/NumPy/HDF5 work, so on 2 cores this finishes sooner than one stage at a time with 2 threads.
# `make all JOBS=1` runs them one by one (with all threads); the output of each stage is kept together.
NPROC := $(shell nproc 2>/dev/null || echo 1)
JOBS ?= $(NPROC)
THREADS ?= $(shell n=$$(( $(NPROC) / $(JOBS) )); [ $$n -ge 1 ] && echo $$n || echo 1)

all: install
	OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(MAKE) --no-print-directory -j$(JOBS) \
		--output-sync=target pipeline

pipeline: $(R)/table9.json

# -- the embedded dataset ------------------------------------------------------------------------------------
$(SYNTH_ROOT)/VOC2007/ImageSets/Main/test.txt: | install
	$(SPP) data synth --out $(SYNTH_ROOT)

DATA_DEP := $(if $(filter synth,$(DATASET)),$(SYNTH_ROOT)/VOC2007/ImageSets/Main/test.txt,) $(CONFIG_FILE)

# -- stages --------------------------------------------------------------------------------------------------
# Pretraining is on the critical path with only the short proposals stage beside it: it gets every core.
$(R)/00_pretrain/MANIFEST.json: $(DATA_DEP) | install
	OMP_NUM_THREADS=$(NPROC) MKL_NUM_THREADS=$(NPROC) $(SPP) pretrain $(ARGS)

$(R)/01_proposals/%/MANIFEST.json: $(DATA_DEP) | install
	$(SPP) proposals $(ARGS) --split $*

$(R)/02_features/%/MANIFEST.json: $(R)/00_pretrain/MANIFEST.json | install
	$(SPP) extract-features $(ARGS) --split $*

$(R)/03_finetune/MANIFEST.json: $(R)/00_pretrain/MANIFEST.json $(R)/01_proposals/$(TRAIN)/MANIFEST.json \
		$(R)/02_features/$(TRAIN)/MANIFEST.json
	$(SPP) finetune $(ARGS)

TRAIN_INPUTS := $(R)/01_proposals/$(TRAIN)/MANIFEST.json $(R)/02_features/$(TRAIN)/MANIFEST.json
TEST_INPUTS := $(R)/01_proposals/$(TEST)/MANIFEST.json $(R)/02_features/$(TEST)/MANIFEST.json
scale_flag = $(if $(filter s1,$(1)),--one-scale,)

define svm_rule
$(R)/04_svm/$(1)-$(2)/MANIFEST.json: $(TRAIN_INPUTS) $(if $(findstring ft,$(1)),$(R)/03_finetune/MANIFEST.json)
	$(SPP) train-svm $(ARGS) --feature $(1) $(call scale_flag,$(2))
endef

define detect_rule
$(R)/06_detect/$(TEST)-$(1)-$(2)$(3)/MANIFEST.json: $(TEST_INPUTS) \
		$(if $(filter softmax,$(1)),$(R)/03_finetune/MANIFEST.json,$(R)/04_svm/$(1)-$(2)/MANIFEST.json) \
		$(if $(3),$(R)/05_bbox/$(2)/MANIFEST.json)
	$(SPP) detect $(ARGS) --split $(TEST) --feature $(1) $(call scale_flag,$(2)) $(if $(3),--bbox,--no-bbox)
$(R)/07_eval/$(TEST)-$(1)-$(2)$(3)/MANIFEST.json: $(R)/06_detect/$(TEST)-$(1)-$(2)$(3)/MANIFEST.json
	$(SPP) eval $(ARGS) --split $(TEST) --feature $(1) $(call scale_flag,$(2)) $(if $(3),--bbox,--no-bbox)
endef

SCALE_TAGS := $(sort s1 s$(N_SCALES))
BB_SCORERS := ftfc7 $(filter softmax,$(SCORERS))
$(foreach f,$(SVM_FEATURES),$(foreach s,$(SCALE_TAGS),$(eval $(call svm_rule,$(f),$(s)))))
$(foreach f,$(SCORERS),$(foreach s,$(SCALE_TAGS),$(eval $(call detect_rule,$(f),$(s),))))
$(foreach f,$(BB_SCORERS),$(foreach s,$(SCALE_TAGS),$(eval $(call detect_rule,$(f),$(s),-bb))))

$(R)/05_bbox/%/MANIFEST.json: $(TRAIN_INPUTS)
	$(SPP) train-bbox $(ARGS) $(call scale_flag,$*)

# The fine-tuned rows first: Make starts prerequisites in this order, so with parallel jobs fine-tuning (the
# longest stage after pretraining) starts the moment the trainval features exist, and pool5/fc7 fill the other slot.
EVALS := $(foreach f,$(BB_SCORERS),$(foreach s,$(SCALE_TAGS),$(R)/07_eval/$(TEST)-$(f)-$(s)-bb/MANIFEST.json)) \
	$(foreach f,$(filter ftfc7,$(SCORERS)) $(filter-out ftfc7,$(SCORERS)),\
	$(foreach s,$(SCALE_TAGS),$(R)/07_eval/$(TEST)-$(f)-$(s)/MANIFEST.json))

$(R)/table9.json: $(EVALS)
	$(SPP) table9 $(ARGS) --json $@

clean-run:
	rm -rf $(R)
