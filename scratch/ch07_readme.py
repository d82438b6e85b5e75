# to paste into tools/readme_tables.py once an fp8_grouped_gemm record exists (kind, GPU from its file name)
def ch07(rec: Records) -> str:
    r = rec("fp8_grouped_gemm", H100)
    dense = r.data["dense_tflops"]
    rows = []
    for row in r.data["rows"]:
        if "error" in row:
            rows.append([shape_label(row["shape"]), row["proj"], row["error"], "", "", "", ""])
            continue
        tf = lambda name: row.get(name, {}).get("tflops")
        v = fp8.gemm_verdict(row, dense)
        rows.append([shape_label(row["shape"]), row["proj"],
                     " / ".join(f"{tf(n):.0f}" if tf(n) else "-" for n in ("07_1+07_2", "07_2", "torch._scaled_grouped_mm",
                                                                           "03_2 bf16", "torch._grouped_mm")),
                     f"{v['of_dense_fp8']:.0%}", x(v["over_bf16"]),
                     x(v["over_torch_fp8"]) if v["over_torch_fp8"] else "-", "met" if v["met"] else "not met"])
    return (table(["shape (T, d, n, E, K)", "proj", "TFLOP/s: 07_1+07_2 / 07_2 / torch FP8 / 03_2 bf16 / torch bf16",
                   "of dense FP8", "over 03_2 bf16", "over torch FP8", "issue 21's minimum"], rows)
            + f"\nDense 8192³ in the same run: FP8 e4m3 (`torch._scaled_mm`, row-wise) {dense['fp8']:.0f} TFLOP/s, "
              f"bf16 {dense['bf16']:.0f}. `07_1+07_2` includes quantising X (1 x 128 scales); torch's FP8 is given "
              f"inputs already quantised (row-wise). On {_measured_on(r)}.\n"
            + source("fp8_grouped_gemm (H100)"))
