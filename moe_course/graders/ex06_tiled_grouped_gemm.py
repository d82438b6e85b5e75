"""Grader for exercise 06: the shared-memory tiled grouped GEMM (step 3 of chapter 02's ladder,
16 x 16 tiles), written in CUDA C in a cell. How it is checked:
:mod:`moe_course.graders.kernel_exercise`; its cases have several K-slices (a missing
barrier only shows once a second slice overwrites the tiles) and a partial one, and on a GPU its
speed is compared with the naive kernel's."""

from .kernel_exercise import KernelExercise

EXERCISE = KernelExercise(
    title="Exercise 06 · shared-memory tiles", kernel="my_tiled_grouped_gemm", module=__name__,
    compare_with="02_2_naive_grouped")
grade = EXERCISE.grade
