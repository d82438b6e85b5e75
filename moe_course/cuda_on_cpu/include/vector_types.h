// vector_types.h for CUDA C run on the CPU (moe_course.cuda_on_cpu): CUDA's small vector types
// with the GPU's alignment (a uint4 or float4 is 16-byte aligned: a load through a pointer
// that is not is a fault on the GPU and is reported as one here), and their make_ functions.
#pragma once

#define COURSE_VECTOR2(T, name, align)                                        \
    struct __attribute__((aligned(align))) name { T x, y; };                 \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define COURSE_VECTOR3(T, name)                                               \
    struct name { T x, y, z; };                                               \
    inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define COURSE_VECTOR4(T, name, align)                                        \
    struct __attribute__((aligned(align))) name { T x, y, z, w; };           \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

COURSE_VECTOR2(char, char2, 2)
COURSE_VECTOR4(char, char4, 4)
COURSE_VECTOR2(unsigned char, uchar2, 2)
COURSE_VECTOR4(unsigned char, uchar4, 4)
COURSE_VECTOR2(short, short2, 4)
COURSE_VECTOR4(short, short4, 8)
COURSE_VECTOR2(unsigned short, ushort2, 4)
COURSE_VECTOR4(unsigned short, ushort4, 8)
COURSE_VECTOR2(int, int2, 8)
COURSE_VECTOR3(int, int3)
COURSE_VECTOR4(int, int4, 16)
COURSE_VECTOR2(unsigned int, uint2, 8)
COURSE_VECTOR3(unsigned int, uint3)
COURSE_VECTOR4(unsigned int, uint4, 16)
COURSE_VECTOR2(long long, longlong2, 16)
COURSE_VECTOR2(unsigned long long, ulonglong2, 16)
COURSE_VECTOR2(float, float2, 8)
COURSE_VECTOR3(float, float3)
COURSE_VECTOR4(float, float4, 16)
COURSE_VECTOR2(double, double2, 16)

#undef COURSE_VECTOR2
#undef COURSE_VECTOR3
#undef COURSE_VECTOR4

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
