"""Horovod's own Keras examples, ported (examples/horovod_keras/: the import line, bundled data
and what Keras 3 demands changed), run under mpirun -np 2 and train to their accuracy."""

import re
import sys

from mpirun import REPO, job_env, mpirun_command, run_command

EXAMPLES = REPO / "examples" / "horovod_keras"


#: Epochs of the mnist example's fit (Horovod's 24 by default): each is 250 steps of 128 digits per
#: rank, 18 passes over the 1797 digits, so the accuracy bar is passed well before 24; 6 keep
#: the 3 warm-up epochs and 3 at the scaled rate after them.
MNIST_EPOCHS = 6


def test_tensorflow2_keras_mnist_trains_and_its_checkpoints_load_without_mpi(tmp_path):
    job = run_command([*mpirun_command(2), sys.executable, str(EXAMPLES / "tensorflow2_keras_mnist.py"),
                       "--epochs", str(MNIST_EPOCHS)], timeout=600, cwd=tmp_path).check()
    accuracies = [float(a) for a in re.findall(r"accuracy: ([0-9.]+)", job.stdout)]
    assert len(accuracies) >= MNIST_EPOCHS and accuracies[-1] >= 0.97, job.stdout[-3000:]  # rank 0 alone prints
    # the warm-up ends at epoch 3 at the scaled rate 0.001 * size, as in Horovod
    assert job.stdout.count("Epoch 3: finished gradual learning rate warmup to 0.002.") == 1, job.stdout[-3000:]
    assert len(list(tmp_path.glob("checkpoint-*.keras"))) == MNIST_EPOCHS
    last = tmp_path / f"checkpoint-{MNIST_EPOCHS}.keras"
    # hvd.load_model in a plain process (no mpirun): the optimizer comes back distributed, its
    # state included, and loading starts neither MPI nor Horovod
    code = (f"import sys, hvdagents.keras as hvd; m = hvd.load_model({str(last)!r}, compression=hvd.Compression.fp16); "
            "mpi = sys.modules.get('mpi4py.MPI'); "
            "print(type(m.optimizer).__name__, m.optimizer.compression, int(m.optimizer.iterations.numpy()), "
            "bool(mpi and mpi.Is_initialized()), 'horovod.tensorflow' in sys.modules)")
    out = run_command([sys.executable, "-c", code], timeout=180, env=job_env()).check()
    assert f"DistributedOptimizer fp16 {MNIST_EPOCHS * 250} False False" in out.stdout, out.output  # x 250 steps
    # inference in a plain Keras process that never imports hvdagents: compile=False (the README
    # says why the optimizer's class needs hvdagents.keras imported)
    code = (f"import keras, numpy as np; m = keras.models.load_model({str(last)!r}, compile=False); "
            "print('classes', m.predict(np.zeros((2, 8, 8, 1), 'float32'), verbose=0).shape)")
    out = run_command([sys.executable, "-c", code], timeout=180, env=job_env()).check()
    assert "classes (2, 10)" in out.stdout, out.output


def test_keras_mnist_advanced_trains_to_its_accuracy(tmp_path):
    job = run_command([*mpirun_command(2), sys.executable, str(EXAMPLES / "keras_mnist_advanced.py")],
                      timeout=600, cwd=tmp_path).check()
    accuracies = [float(a) for a in re.findall(r"Test accuracy: ([0-9.]+)", job.stdout)]
    assert len(accuracies) == 2, job.stdout[-3000:]  # every rank evaluates, as in Horovod's script
    assert min(accuracies) >= 0.85, job.stdout[-3000:]
    assert accuracies[0] == accuracies[1]  # one model on both ranks
    assert job.stdout.count("Epoch 5: finished gradual learning rate warmup to 2.") == 1


def test_tensorflow2_keras_synthetic_benchmark_runs_and_reports(tmp_path):
    args = ["--model", "MobileNetV2", "--batch-size", "4", "--num-batches-per-iter", "2", "--num-iters", "3",
            "--no-cuda", "--fp16-allreduce"]
    job = run_command([*mpirun_command(2), sys.executable, str(EXAMPLES / "tensorflow2_keras_synthetic_benchmark.py"),
                       *args], timeout=600, cwd=tmp_path).check()
    assert job.stdout.count("Model: MobileNetV2") == 1  # rank 0 alone prints, as in Horovod's script
    assert re.search(r"Iter #2: [0-9.]+ img/sec per CPU", job.stdout), job.stdout[-2000:]
    assert re.search(r"Total img/sec on 2 CPU\(s\): [0-9.]+ \+-[0-9.]+", job.stdout), job.stdout[-2000:]
