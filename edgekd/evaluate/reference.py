"""The models a run is judged against: the teacher (fp32 and int8) and the fp32 student, as ONNX.

The shipped student comes from the bundle; these sit beside it so `edgekd bench` compares all of them in
one run, with one timing routine.
"""

from __future__ import annotations

import logging
import json
from pathlib import Path

from edgekd.evaluate.bench import BenchModel
from edgekd.data import LoadedData
from edgekd.deploy.bundle import read_shipped_form
from edgekd.deploy.export import export_onnx, is_transformer
from edgekd.deploy.quantize import CALIBRATION_IMAGES, quantize_onnx
from edgekd.distill.students import load_student
from edgekd.distill.teacher import load_teacher_model
from edgekd.types import Preprocess, StudentCheckpoint, TeacherResult
from edgekd.deploy.verify import preprocess_records

log = logging.getLogger(__name__)


def teacher_int8_precision(fp32_path: Path) -> str:
    """Dynamic int8 for transformers (MatMul-heavy: it wins there), static QDQ for CNNs (ConvInteger is slow)."""
    import onnx

    return "int8_dynamic" if is_transformer(onnx.load(str(fp32_path), load_external_data=False)) else "int8_static"


def export_reference_models(teacher: TeacherResult, student: StudentCheckpoint, bundle_dir: Path, folder: Path,
                            data: LoadedData, isa: str) -> list[BenchModel]:
    folder.mkdir(parents=True, exist_ok=True)
    teacher_fp32 = export_onnx(load_teacher_model(teacher), folder / "teacher.fp32.onnx",
                               teacher.preprocess.input_size)
    precision = teacher_int8_precision(teacher_fp32)
    calibration = preprocess_records(data.train, teacher.preprocess, CALIBRATION_IMAGES).images
    teacher_int8 = quantize_onnx(teacher_fp32, folder / "teacher.int8.onnx", precision, isa=isa,
                                 calibration=calibration)
    shipped_precision = read_shipped_form(bundle_dir).precision
    labels = teacher.class_names
    short = teacher.model_name.split(".")[0]
    models = [BenchModel(f"teacher {short} fp32", teacher_fp32, "teacher", "fp32", teacher.preprocess, labels),
              BenchModel(f"teacher {short} {precision}", teacher_int8, "teacher-int8", precision, teacher.preprocess,
                         labels)]
    if shipped_precision != "fp32":  # an fp32 bundle is the student's fp32 model: one row, not the same one twice
        student_fp32 = export_onnx(load_student(student), folder / "student.fp32.onnx",
                                   student.preprocess.input_size)
        models.append(BenchModel(f"student {student.model_name} fp32", student_fp32, "student-fp32", "fp32",
                                 student.preprocess, labels))
    return models + [BenchModel(f"student {student.model_name} {shipped_precision} (shipped)",
                                bundle_dir / "model.onnx", "student", shipped_precision,
                                _bundle_preprocess(bundle_dir, student.preprocess), labels)]


def _bundle_preprocess(bundle_dir: Path, fallback: Preprocess) -> Preprocess:
    path = bundle_dir / "preprocess.json"
    return Preprocess.from_dict(json.loads(path.read_text())) if path.exists() else fallback
