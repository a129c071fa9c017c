set -x
cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv
python benchmarks/diagnose_model.py --model bert --p 0.3 --batch 16 --seq 512 --steps 10 --variants inductor sparsedrop no_attention attention_only --profile --host-profile --out $OUT/diag 2>&1 | grep -v Warning | tee $OUT/call1_diag.log
python ../lb.py 36 benchmarks/diagnose_model.py --model bert --p 0.3 --batch 16 --seq 512 --steps 10 --variants sparsedrop --host-profile 2>&1 | grep -v Warning | tee $OUT/call1_lb36.log
python benchmarks/profile_host.py --model bert --p 0.3 --batch 16 --seq 512 --backend sparsedrop --top 45 2>&1 | tee $OUT/call1_cprof.log
