"""Grader for exercise 03: the one-launch naive grouped GEMM (step 2 of chapter 02's ladder),
written in CUDA C in a cell. How it is checked: :mod:`moe_course.graders.kernel_exercise`."""

from .kernel_exercise import KernelExercise

EXERCISE = KernelExercise(title="Exercise 03 · one-launch grouped GEMM", kernel="my_grouped_gemm", module=__name__)
grade = EXERCISE.grade
