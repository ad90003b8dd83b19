# Made by this script at commit def3638 (worktree /work/wt/study-run2), on the pre-issue-14 fashion runs
# (lr 1e-3, epsilon 1e-8; their study cells were evaluated at commit 2749a49). Usage: run.sh rp
# (its outputs were written to results/study_fashion_mnist/bn_diagnostic and moved here afterwards)
# BN diagnostic on the fashion grid's final checkpoints: the study's probe protocol, with and without
# batch-norm statistics re-estimated on 2048 probe-train images.
cd /work/wt/study-run2
export TF_CPP_MIN_LOG_LEVEL=2 TF_MTSSL_DATA_DIR=/work/wt/study/data/embedded
RUNS=/work/wt/study-run/runs/study_fashion_mnist/runs
OUT=/work/wt/study/results/study_fashion_mnist/bn_diagnostic
COMMON="--data=fashion_mnist --probes=linear,knn --weight_decays=0,0.001,0.01,0.1,1 --knn_ks=1,5,10,20,50 --image_size=32 --crop_fraction=1 --train_steps=300 --lr_boundaries=200,250 --batch_size=256 --eval_batch_size=500 --seed=0"
for cfg in "$@"; do
  if [ "$cfg" = random ]; then
    SRC="--init=random --depth=26 --base_width=16 --output_stride=16"
  else
    RUN=$(ls -d $RUNS/$cfg-s0-* | head -1); SRC="--model_dir=$RUN --checkpoint=ckpt-900"
  fi
  for bn in false true; do
    nice -n 5 /work/main/.venv/bin/python -m tf_mtssl.evaluate_linear $SRC $COMMON --reestimate_bn=$bn \
      --output_dir=$OUT/$cfg-s0-bn_$bn 2>&1 | grep "^linear:\|^knn:\|Error"
  done
done
