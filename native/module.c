/* hvd_signsgd._native: CPython binding of the sign kernels (no PyTorch dependency).
 *
 * Arguments are raw buffers (buffer protocol: numpy arrays, bytes, bytearray, memoryview).
 * Element types come from the buffer format: 'f' float32, 'e' float16, 'h'/'H' bfloat16 bit
 * patterns (bfloat16 has no format of its own), 'B'/'b' packed bytes. Every check raises
 * TypeError (wrong type / format) or ValueError (shape, length, contiguity, aliasing, values);
 * the kernels run with the GIL released. See hvd_signsgd/kernels/__init__.py for semantics.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "sg_scalar.h"
#include "sg_sparse.h"

#if SG_HAVE_AVX2
#include <cpuid.h>
#endif

/* ---- ISA dispatch ------------------------------------------------------------------------ */

static const sg_kernels *active = &sg_kernels_portable;

static int cpu_has_avx2(void) {
#if SG_HAVE_AVX2
    unsigned a, b, c, d;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c & bit_F16C) != 0;
#else
    return 0;
#endif
}

/* name: "auto", "portable" or "avx2". Returns 0, or -1 with a ValueError set. */
static int select_isa(const char *name) {
    int avx2 = cpu_has_avx2();
    if (strcmp(name, "portable") == 0) {
        active = &sg_kernels_portable;
    } else if (strcmp(name, "auto") == 0 || strcmp(name, "") == 0) {
#if SG_HAVE_AVX2
        active = avx2 ? &sg_kernels_avx2 : &sg_kernels_portable;
#endif
    } else if (strcmp(name, "avx2") == 0) {
#if SG_HAVE_AVX2
        if (avx2) {
            active = &sg_kernels_avx2;
            return 0;
        }
#endif
        PyErr_SetString(PyExc_ValueError, "this CPU (or build) has no AVX2 kernels");
        return -1;
    } else {
        PyErr_Format(PyExc_ValueError, "unknown ISA '%s' (expected auto, portable or avx2)",
                     name);
        return -1;
    }
    return 0;
}

static PyObject *py_isa(PyObject *self, PyObject *args) {
    return PyUnicode_FromString(active->name);
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_isa", &name)) return NULL;
    const char *previous = active->name;
    if (select_isa(name) < 0) return NULL;
    return PyUnicode_FromString(previous);
}

static PyObject *py_available_isas(PyObject *self, PyObject *args) {
    if (cpu_has_avx2()) return Py_BuildValue("(ss)", "portable", "avx2");
    return Py_BuildValue("(s)", "portable");
}

/* ---- buffers ----------------------------------------------------------------------------- */

enum { ARG_IN = 0, ARG_OUT = 1 };

/* Gets a buffer; output buffers must be writable. Failures become TypeError / ValueError. */
static int get_buffer(PyObject *obj, const char *name, int mode, Py_buffer *view) {
    int flags = PyBUF_STRIDES | PyBUF_FORMAT | (mode == ARG_OUT ? PyBUF_WRITABLE : 0);
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must support the buffer protocol, not %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, flags) == 0) return 0;
    if (PyErr_ExceptionMatches(PyExc_BufferError) || PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: cannot get a %s buffer", name,
                     mode == ARG_OUT ? "writable strided" : "strided");
    }
    return -1;
}

/* The single type code of a native-order format ("f", "@f", "=f", "<f" on little endian). */
static char format_code(const Py_buffer *view) {
    const char *f = view->format ? view->format : "B";
    if (f[0] == '@' || f[0] == '=' || (f[0] == '<' && PY_LITTLE_ENDIAN)) f++;
    return (f[0] != '\0' && f[1] == '\0') ? f[0] : '?';
}

/* Float element type from the format; -1 with TypeError if it is not one of ours. */
static int float_dtype(const Py_buffer *view, const char *name) {
    char code = format_code(view);
    if (code == 'f' && view->itemsize == 4) return SG_F32;
    if (code == 'e' && view->itemsize == 2) return SG_F16;
    if ((code == 'h' || code == 'H') && view->itemsize == 2) return SG_BF16;
    PyErr_Format(PyExc_TypeError,
                 "%s must hold float32 ('f'), float16 ('e') or bfloat16 bits ('h'/'H'), "
                 "got format '%s'", name, view->format ? view->format : "B");
    return -1;
}

static int check_bytes_format(const Py_buffer *view, const char *name) {
    char code = format_code(view);
    if ((code == 'B' || code == 'b') && view->itemsize == 1) return 0;
    PyErr_Format(PyExc_TypeError, "%s must hold bytes (uint8, format 'B'), got format '%s'",
                 name, view->format ? view->format : "B");
    return -1;
}

static int check_contiguous(const Py_buffer *view, const char *name) {
    if (PyBuffer_IsContiguous(view, 'C')) return 0;
    PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", name);
    return -1;
}

static int check_float32_aligned(const Py_buffer *view, const char *name) {
    if (format_code(view) != 'f' || view->itemsize != 4) {
        PyErr_Format(PyExc_TypeError, "%s must be float32 (format 'f')", name);
        return -1;
    }
    if ((uintptr_t)view->buf % sizeof(float) != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be 4-byte aligned", name);
        return -1;
    }
    return 0;
}

static int check_room(Py_ssize_t have, size_t need, const char *name, const char *unit) {
    if ((size_t)have >= need) return 0;
    PyErr_Format(PyExc_ValueError, "%s too small: %zd %s, need %zu", name, have, unit, need);
    return -1;
}

/* Byte ranges [a, a+na) and [b, b+nb) overlap: the kernels do not support in-place use. */
static int check_disjoint(const void *a, size_t na, const void *b, size_t nb) {
    uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
    if (na == 0 || nb == 0 || pa + na <= pb || pb + nb <= pa) return 0;
    PyErr_SetString(PyExc_ValueError, "output overlaps an input");
    return -1;
}

static int check_count(Py_ssize_t n) {
    if (n >= 0) return 0;
    PyErr_SetString(PyExc_ValueError, "n must be >= 0");
    return -1;
}

/* Packed output: the caller's buffer (>= ceil(n/8) bytes), or a new bytes object. */
static PyObject *packed_output(PyObject *out, size_t n, const Py_buffer *in, Py_buffer *view,
                               uint8_t **dst) {
    size_t nbytes = sg_nbytes(n);
    if (out == Py_None) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)nbytes);
        if (b) *dst = (uint8_t *)PyBytes_AS_STRING(b);
        return b;
    }
    if (get_buffer(out, "out", ARG_OUT, view) < 0) return NULL;
    if (check_bytes_format(view, "out") < 0 || check_contiguous(view, "out") < 0 ||
        check_room(view->len, nbytes, "out", "bytes") < 0 ||
        check_disjoint(in->buf, (size_t)in->len, view->buf, nbytes) < 0) {
        PyBuffer_Release(view);
        return NULL;
    }
    *dst = (uint8_t *)view->buf;
    Py_INCREF(out);
    return out;
}

/* ---- pack_signs / pack_stochastic_signs -------------------------------------------------- */

PyDoc_STRVAR(pack_signs_doc,
"pack_signs(x, out=None) -> out or bytes\n\n"
"Packs the IEEE sign bits of the C-contiguous float buffer x (float32 'f', float16 'e',\n"
"bfloat16 bits 'h'/'H') into ceil(n/8) bytes, LSB first, padding bits 0.");

static PyObject *py_pack_signs(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "out", NULL};
    PyObject *xo, *out = Py_None, *result = NULL;
    Py_buffer x, o = {0};
    uint8_t *dst = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:pack_signs", kwlist, &xo, &out)) return NULL;
    if (get_buffer(xo, "x", ARG_IN, &x) < 0) return NULL;
    int dt = float_dtype(&x, "x");
    if (dt < 0 || check_contiguous(&x, "x") < 0) goto done;
    size_t n = (size_t)(x.len / x.itemsize);
    result = packed_output(out, n, &x, &o, &dst);
    if (!result) goto done;
    if (n) {
        Py_BEGIN_ALLOW_THREADS
        active->pack(x.buf, (sg_dtype)dt, n, dst);
        Py_END_ALLOW_THREADS
    }
done:
    if (o.obj) PyBuffer_Release(&o);
    PyBuffer_Release(&x);
    return result;
}

PyDoc_STRVAR(count_zeros_doc,
"count_zeros(x) -> int\n\n"
"Number of elements of the contiguous float buffer x that are +0 or -0.");

static PyObject *py_count_zeros(PyObject *self, PyObject *args) {
    PyObject *xo, *result = NULL;
    Py_buffer x;
    if (!PyArg_ParseTuple(args, "O:count_zeros", &xo)) return NULL;
    if (get_buffer(xo, "x", ARG_IN, &x) < 0) return NULL;
    int dt = float_dtype(&x, "x");
    if (dt >= 0 && check_contiguous(&x, "x") == 0) {
        size_t n = (size_t)(x.len / x.itemsize), count = 0;
        if (n) {
            Py_BEGIN_ALLOW_THREADS
            count = active->count_zeros(x.buf, (sg_dtype)dt, n);
            Py_END_ALLOW_THREADS
        }
        result = PyLong_FromSize_t(count);
    }
    PyBuffer_Release(&x);
    return result;
}

PyDoc_STRVAR(pack_stochastic_signs_doc,
"pack_stochastic_signs(x, norm, seed, offset=0, out=None) -> out or bytes\n\n"
"Stochastic signs: element i is +1 (bit 0) with probability 1/2 + x_i/(2 norm), clamped\n"
"to [0, 1], from a counter-based hash of (seed, offset + i). norm >= 0 (0: fair coins);\n"
"seed is taken modulo 2^64; 0 <= offset and offset + n <= 2^63.");

static PyObject *py_pack_stochastic_signs(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "norm", "seed", "offset", "out", NULL};
    PyObject *xo, *seed_obj, *offset_obj = NULL, *out = Py_None, *result = NULL;
    double norm;
    Py_buffer x, o = {0};
    uint8_t *dst = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OdO|OO:pack_stochastic_signs", kwlist, &xo,
                                     &norm, &seed_obj, &offset_obj, &out))
        return NULL;
    if (!PyLong_Check(seed_obj) || (offset_obj && !PyLong_Check(offset_obj))) {
        PyErr_SetString(PyExc_TypeError, "seed and offset must be int");
        return NULL;
    }
    if (!(norm >= 0.0)) {
        PyErr_SetString(PyExc_ValueError, "norm must be >= 0 (and not NaN)");
        return NULL;
    }
    uint64_t seed = PyLong_AsUnsignedLongLongMask(seed_obj);
    if (seed == (uint64_t)-1 && PyErr_Occurred()) return NULL;
    long long offset = offset_obj ? PyLong_AsLongLong(offset_obj) : 0;
    if (offset == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        offset = -1;
    }
    if (get_buffer(xo, "x", ARG_IN, &x) < 0) return NULL;
    int dt = float_dtype(&x, "x");
    if (dt < 0 || check_contiguous(&x, "x") < 0) goto done;
    size_t n = (size_t)(x.len / x.itemsize);
    if (offset < 0 || (uint64_t)offset + n > ((uint64_t)1 << 63)) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= offset and offset + n <= 2**63");
        goto done;
    }
    result = packed_output(out, n, &x, &o, &dst);
    if (!result) goto done;
    /* c = float32(min(2^23 / norm, FLT_MAX)): a tiny norm must not make 0 * c a NaN. */
    double c64 = norm == 0.0 ? 0.0 : 8388608.0 / norm;
    float c = (float)(c64 < FLT_MAX ? c64 : FLT_MAX);
    uint64_t key = sg_splitmix64(seed);
    if (n) {
        Py_BEGIN_ALLOW_THREADS
        active->pack_stochastic(x.buf, (sg_dtype)dt, n, c, key, (uint64_t)offset, dst);
        Py_END_ALLOW_THREADS
    }
done:
    if (o.obj) PyBuffer_Release(&o);
    PyBuffer_Release(&x);
    return result;
}

/* ---- unpack_signs ------------------------------------------------------------------------ */

PyDoc_STRVAR(unpack_signs_doc,
"unpack_signs(bits, n, out, scale=1.0) -> None\n\n"
"out[i] = -scale if bit i of bits is set else +scale, for i < n. out: C-contiguous float32\n"
"('f'), float16 ('e') or bfloat16 bits ('h'/'H') with at least n elements; scale is rounded\n"
"to float32, then to out's type (round to nearest even).");

static PyObject *py_unpack_signs(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"bits", "n", "out", "scale", NULL};
    PyObject *bo, *oo, *result = NULL;
    Py_ssize_t n;
    double scale = 1.0;
    Py_buffer b, o = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnO|d:unpack_signs", kwlist, &bo, &n, &oo,
                                     &scale))
        return NULL;
    if (check_count(n) < 0 || get_buffer(bo, "bits", ARG_IN, &b) < 0) return NULL;
    if (check_bytes_format(&b, "bits") < 0 || check_contiguous(&b, "bits") < 0 ||
        check_room(b.len, sg_nbytes((size_t)n), "bits", "bytes") < 0 ||
        get_buffer(oo, "out", ARG_OUT, &o) < 0)
        goto done;
    int dt = float_dtype(&o, "out");
    if (dt < 0 || check_contiguous(&o, "out") < 0 ||
        check_room(o.len / o.itemsize, (size_t)n, "out", "elements") < 0 ||
        check_disjoint(b.buf, sg_nbytes((size_t)n), o.buf, (size_t)n * (size_t)o.itemsize) < 0)
        goto done;
    float s = (float)scale;
    uint32_t value_bits = dt == SG_F32   ? sg_bits_from_f32(s)
                          : dt == SG_F16 ? sg_f32_to_f16(s)
                                         : sg_f32_to_bf16(s);
    if (n) {
        Py_BEGIN_ALLOW_THREADS
        active->unpack((const uint8_t *)b.buf, (size_t)n, value_bits, (sg_dtype)dt, o.buf);
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    if (o.obj) PyBuffer_Release(&o);
    PyBuffer_Release(&b);
    return result;
}

/* ---- vote ------------------------------------------------------------------------------- */

/* Rows of `gathered`: a 2-D buffer (n_ranks, row_len) with unit stride inside a row and any
 * row stride, or a 1-D C-contiguous buffer of n_ranks equal rows laid end to end. */
static int gathered_rows(const Py_buffer *g, Py_ssize_t n_ranks_arg, sg_rows *rows,
                         Py_ssize_t *row_len) {
    if (g->ndim == 2) {
        if (n_ranks_arg >= 0 && n_ranks_arg != g->shape[0]) {
            PyErr_SetString(PyExc_ValueError, "n_ranks does not match gathered.shape[0]");
            return -1;
        }
        if (g->shape[1] > 1 && g->strides[1] != 1) {
            PyErr_SetString(PyExc_ValueError, "gathered rows must have unit stride");
            return -1;
        }
        rows->n_ranks = (size_t)g->shape[0];
        rows->stride = g->strides[0];
        *row_len = g->shape[1];
    } else if (g->ndim == 1) {
        if (n_ranks_arg <= 0 || g->len % n_ranks_arg != 0) {
            PyErr_SetString(PyExc_ValueError,
                            "1-D gathered needs n_ranks > 0 dividing its length");
            return -1;
        }
        if (check_contiguous(g, "gathered") < 0) return -1;
        rows->n_ranks = (size_t)n_ranks_arg;
        rows->stride = g->len / n_ranks_arg;
        *row_len = rows->stride;
    } else {
        PyErr_SetString(PyExc_ValueError, "gathered must be 1-D or 2-D");
        return -1;
    }
    rows->base = (const uint8_t *)g->buf;
    if (rows->n_ranks == 0 || rows->n_ranks > ((size_t)1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "need 1 <= n_ranks <= 2**24");
        return -1;
    }
    return 0;
}

/* Lowest address and length of the bytes the vote reads. */
static void rows_extent(const sg_rows *rows, size_t nbytes, uintptr_t *lo, size_t *len) {
    ptrdiff_t last = (ptrdiff_t)(rows->n_ranks - 1) * rows->stride;
    uintptr_t first = (uintptr_t)rows->base;
    *lo = last < 0 ? first + (uintptr_t)last : first;
    *len = (size_t)(last < 0 ? -last : last) + nbytes;
}

/* Copies the weights into an aligned float array (NULL with an exception on error). */
static float *read_weights(PyObject *wo, size_t n_ranks) {
    Py_buffer wv;
    float *w = NULL;
    if (get_buffer(wo, "weights", ARG_IN, &wv) < 0) return NULL;
    if (format_code(&wv) != 'f' || wv.itemsize != 4) {
        PyErr_SetString(PyExc_TypeError, "weights must be float32 (format 'f')");
    } else if (check_contiguous(&wv, "weights") == 0) {
        if ((size_t)(wv.len / 4) != n_ranks)
            PyErr_Format(PyExc_ValueError, "weights has %zd values, need n_ranks = %zu",
                         wv.len / 4, n_ranks);
        else if ((w = PyMem_Malloc(n_ranks * sizeof(float))) == NULL)
            PyErr_NoMemory();
        else
            memcpy(w, wv.buf, n_ranks * sizeof(float));
    }
    PyBuffer_Release(&wv);
    return w;
}

PyDoc_STRVAR(vote_doc,
"vote(gathered, n, out, mode='majority', weights=None, n_ranks=None) -> None\n\n"
"Per element i < n, with s_m = +1 (bit 0) or -1 (bit 1) from rank m's packed row:\n"
"mode 'sum': sum_m w_m s_m; mode 'majority': its sign (ties give 0); mode 'mean' (no\n"
"weights): the sum / n_ranks, one float32 division. Unweighted sums are exact integers;\n"
"weighted ones are float32 additions from +0.0 in rank order.\n"
"gathered: uint8 2-D (n_ranks, >= ceil(n/8)) with unit stride in a row, or 1-D contiguous\n"
"with n_ranks given. out: float32, C-contiguous, aligned, >= n elements.\n"
"weights: float32 buffer of n_ranks values or None.");

static PyObject *py_vote(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"gathered", "n", "out", "mode", "weights", "n_ranks", NULL};
    PyObject *go, *oo, *wo = Py_None, *nro = Py_None, *result = NULL;
    const char *mode = "majority";
    Py_ssize_t n, n_ranks = -1, row_len;
    Py_buffer g, o = {0};
    sg_rows rows;
    float *w = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnO|sOO:vote", kwlist, &go, &n, &oo, &mode, &wo,
                                     &nro))
        return NULL;
    int how = strcmp(mode, "majority") == 0 ? SG_VOTE_MAJORITY
              : strcmp(mode, "mean") == 0   ? SG_VOTE_MEAN
              : strcmp(mode, "sum") == 0    ? SG_VOTE_SUM
                                            : -1;
    if (how < 0 || (how == SG_VOTE_MEAN && wo != Py_None)) {
        PyErr_Format(PyExc_ValueError, "mode must be 'majority', 'sum' or 'mean' (unweighted), "
                     "not '%s'", mode);
        return NULL;
    }
    if (nro != Py_None && (n_ranks = PyLong_AsSsize_t(nro)) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "n_ranks must be > 0");
        return NULL;
    }
    if (check_count(n) < 0 || get_buffer(go, "gathered", ARG_IN, &g) < 0) return NULL;
    size_t nbytes = sg_nbytes((size_t)n);
    if (check_bytes_format(&g, "gathered") < 0 ||
        gathered_rows(&g, n_ranks, &rows, &row_len) < 0 ||
        check_room(row_len, nbytes, "gathered rows", "bytes") < 0 ||
        get_buffer(oo, "out", ARG_OUT, &o) < 0)
        goto done;
    uintptr_t lo;
    size_t extent;
    rows_extent(&rows, nbytes, &lo, &extent);
    if (check_float32_aligned(&o, "out") < 0 || check_contiguous(&o, "out") < 0 ||
        check_room(o.len / 4, (size_t)n, "out", "elements") < 0 ||
        check_disjoint((const void *)lo, nbytes ? extent : 0, o.buf, (size_t)n * 4) < 0)
        goto done;
    if (wo != Py_None && (w = read_weights(wo, rows.n_ranks)) == NULL) goto done;
    if (n) {
        float *dst = (float *)o.buf;
        Py_BEGIN_ALLOW_THREADS
        if (w)
            active->vote_weighted(&rows, NULL, (size_t)n, w, how == SG_VOTE_MAJORITY, dst);
        else
            active->vote_count(&rows, (size_t)n, how, dst);
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyMem_Free(w);
    if (o.obj) PyBuffer_Release(&o);
    PyBuffer_Release(&g);
    return result;
}

/* ---- sparse: Top-k / threshold with fused error feedback, scatter-add decode ------------ */

static int check_int_format(const Py_buffer *view, const char *name, Py_ssize_t itemsize) {
    char code = format_code(view);
    int ok = view->itemsize == itemsize &&
             (itemsize == 4 ? (code == 'i' || code == 'l')
                            : (code == 'q' || code == 'l' || code == 'Q'));
    if (ok) return 0;
    PyErr_Format(PyExc_TypeError, "%s must be int%d, got format '%s'", name, (int)(8 * itemsize),
                 view->format ? view->format : "B");
    return -1;
}

/* p: float32, writable, aligned, C-contiguous, at most 2^31 elements (int32 positions). */
static int get_memory(PyObject *po, Py_buffer *p) {
    if (get_buffer(po, "p", ARG_OUT, p) < 0) return -1;
    if (check_float32_aligned(p, "p") < 0 || check_contiguous(p, "p") < 0) return -1;
    if (p->len / 4 > ((Py_ssize_t)1 << 31)) {
        PyErr_SetString(PyExc_ValueError, "p has more than 2**31 elements (int32 indices)");
        return -1;
    }
    return 0;
}

/* idx (int32) and vals (float32 or float16) of exactly `count` elements, writable,
 * C-contiguous, disjoint from p and from each other; fills t. */
static int get_pairs(PyObject *io, PyObject *vo, const Py_buffer *p, Py_buffer *iv,
                     Py_buffer *vv, sg_take *t) {
    if (get_buffer(io, "idx", ARG_OUT, iv) < 0 || check_int_format(iv, "idx", 4) < 0 ||
        check_contiguous(iv, "idx") < 0 || get_buffer(vo, "vals", ARG_OUT, vv) < 0)
        return -1;
    int vt = float_dtype(vv, "vals");
    if (vt < 0) return -1;
    if (vt == SG_BF16) {
        PyErr_SetString(PyExc_TypeError, "vals must be float32 or float16");
        return -1;
    }
    if (check_contiguous(vv, "vals") < 0) return -1;
    if ((uintptr_t)iv->buf % 4 != 0 || (vt == SG_F32 && (uintptr_t)vv->buf % 4 != 0)) {
        PyErr_SetString(PyExc_ValueError, "idx and float32 vals must be 4-byte aligned");
        return -1;
    }
    if (iv->len / 4 != vv->len / vv->itemsize) {
        PyErr_SetString(PyExc_ValueError, "idx and vals must have the same number of elements");
        return -1;
    }
    if (check_disjoint(p->buf, (size_t)p->len, iv->buf, (size_t)iv->len) < 0 ||
        check_disjoint(p->buf, (size_t)p->len, vv->buf, (size_t)vv->len) < 0 ||
        check_disjoint(iv->buf, (size_t)iv->len, vv->buf, (size_t)vv->len) < 0)
        return -1;
    t->p = (float *)p->buf;
    t->idx = (int32_t *)iv->buf;
    t->vals = vv->buf;
    t->vt = (sg_dtype)vt;
    t->cap = (size_t)(iv->len / 4);
    t->count = 0;
    return 0;
}

static void release_all(Py_buffer *views, int n) {
    for (int i = 0; i < n; i++)
        if (views[i].obj) PyBuffer_Release(&views[i]);
}

PyDoc_STRVAR(topk_take_doc,
"topk_take(p, segments, idx, vals) -> None\n\n"
"Per segment (offset, size, k) of the int64 buffer segments (3 values each; ranges of p\n"
"ascending and non-overlapping, k >= 0): the min(k, size) elements of largest magnitude,\n"
"ties to the lowest position, in ascending position order; segments in the given order.\n"
"Writes each taken position g (int32) to idx and v = p[g] to vals (float32, or float16 of\n"
"v clamped to +-65504) and sets p[g] = v - (v as sent). Magnitude is the bit pattern with\n"
"the sign cleared: +0 == -0, NaN above Inf. p: float32, aligned, C-contiguous, <= 2**31\n"
"elements; idx (int32) and vals must hold exactly sum(min(k, size)) elements.");

/* The (offset, size, k) triples of so, copied (unaligned buffers are allowed) into *segs
 * (PyMem_Free it) and checked against p's n elements; *total = sum(min(k, size)). */
static int get_segments(PyObject *so, Py_buffer *sv, size_t n, int64_t **segs, size_t *n_segs,
                        size_t *total) {
    if (get_buffer(so, "segments", ARG_IN, sv) < 0 || check_int_format(sv, "segments", 8) < 0 ||
        check_contiguous(sv, "segments") < 0)
        return -1;
    if (sv->len % 24 != 0) {
        PyErr_SetString(PyExc_ValueError, "segments must hold (offset, size, k) triples");
        return -1;
    }
    size_t end = 0;
    *n_segs = (size_t)(sv->len / 24);
    *total = 0;
    *segs = PyMem_Malloc(sv->len ? (size_t)sv->len : 1);
    if (!*segs) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(*segs, sv->buf, (size_t)sv->len);
    for (size_t s = 0; s < *n_segs; s++) {
        int64_t o = (*segs)[3 * s], z = (*segs)[3 * s + 1], k = (*segs)[3 * s + 2];
        if (o < 0 || z < 0 || k < 0 || (size_t)o < end || (size_t)z > n || (size_t)o > n - (size_t)z) {
            PyErr_Format(PyExc_ValueError,
                         "segment %zu (offset %lld, size %lld, k %lld): need k >= 0 and "
                         "ascending, non-overlapping ranges inside p (%zu elements)",
                         s, (long long)o, (long long)z, (long long)k, n);
            PyMem_Free(*segs);
            *segs = NULL;
            return -1;
        }
        end = (size_t)(o + z);
        *total += (size_t)(k < z ? k : z);
    }
    return 0;
}

static int two_in_one_out(PyObject **o, char **names, Py_buffer *v, size_t *n);

/* topk_take and topk_take_sum (g, e given: v[4], v[5]; v[6] is p's second view). Returns
 * 0, 2 (NaN/Inf in g + e), or -1 with the exception set; the caller releases v. */
static int topk_call(PyObject *po, PyObject *so, PyObject *io, PyObject *vo, PyObject *go,
                     PyObject *eo, Py_buffer *v) {
    int64_t *segs = NULL;
    size_t n_segs, total;
    sg_take t;
    if (get_memory(po, &v[0]) < 0) return -1;
    size_t n = (size_t)(v[0].len / 4);
    if (get_segments(so, &v[1], n, &segs, &n_segs, &total) < 0) return -1;
    int rc = -1;
    if (get_pairs(io, vo, &v[0], &v[2], &v[3], &t) < 0) goto done;
    if (go) {
        PyObject *o[3] = {go, eo, po};
        static char *names[] = {"g", "e", "p"};
        size_t m;
        if (two_in_one_out(o, names, &v[4], &m) < 0) goto done;
        for (int i = 4; i < 6; i++)
            if (check_disjoint(v[i].buf, (size_t)v[i].len, v[2].buf, (size_t)v[2].len) < 0 ||
                check_disjoint(v[i].buf, (size_t)v[i].len, v[3].buf, (size_t)v[3].len) < 0)
                goto done;
    }
    if (t.cap != total) {
        PyErr_Format(PyExc_ValueError, "idx and vals have %zu elements, the segments take %zu",
                     t.cap, total);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = go ? sg_topk_take_sum(active, (const float *)v[4].buf, (const float *)v[5].buf, n, segs,
                               n_segs, &t)
            : sg_topk_take(active, segs, n_segs, &t);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
    } else if (rc == 0 && t.count != total) {
        PyErr_SetString(PyExc_RuntimeError, "p changed during the selection");
        rc = -1;
    }
done:
    PyMem_Free(segs);
    return rc;
}

static PyObject *py_topk_take(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"p", "segments", "idx", "vals", NULL};
    PyObject *po, *so, *io, *vo, *result = NULL;
    Py_buffer v[4] = {{0}};   /* p, segments, idx, vals */
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO:topk_take", kwlist, &po, &so, &io, &vo))
        return NULL;
    if (topk_call(po, so, io, vo, NULL, NULL, v) == 0) {
        Py_INCREF(Py_None);
        result = Py_None;
    }
    release_all(v, 4);
    return result;
}

PyDoc_STRVAR(topk_take_sum_doc,
"topk_take_sum(g, e, p, segments, idx, vals) -> bool\n\n"
"p = g + e (float32 sums, every element), then topk_take(p, segments, idx, vals), in one\n"
"pass over a large segment (the sum is its candidate scan). False, with p, idx and vals\n"
"unspecified, when some sum is NaN/Inf. g, e: float32 vectors of p's length, disjoint from\n"
"p, idx and vals.");

static PyObject *py_topk_take_sum(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"g", "e", "p", "segments", "idx", "vals", NULL};
    PyObject *go, *eo, *po, *so, *io, *vo, *result = NULL;
    Py_buffer v[7] = {{0}};   /* p, segments, idx, vals, g, e, p again */
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOO:topk_take_sum", kwlist, &go, &eo, &po,
                                     &so, &io, &vo))
        return NULL;
    int rc = topk_call(po, so, io, vo, go, eo, v);
    if (rc >= 0) result = PyBool_FromLong(rc == 0);
    release_all(v, 7);
    return result;
}

/* lam rounded to float32 (round to nearest even; +inf above the float32 range), as a key. */
static int threshold_key(double lam, uint32_t *lo) {
    if (!(lam >= 0.0)) {
        PyErr_SetString(PyExc_ValueError, "lam must be >= 0 (and not NaN)");
        return -1;
    }
    float f = lam >= 0x1.ffffffp127 ? (float)INFINITY : lam > FLT_MAX ? FLT_MAX : (float)lam;
    *lo = sg_bits_from_f32(f);
    return 0;
}

PyDoc_STRVAR(threshold_count_doc,
"threshold_count(p, lam) -> int\n\n"
"Number of elements of the float32 buffer p with |p_i| >= float32(lam) (NaN counts).");

static PyObject *py_threshold_count(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"p", "lam", NULL};
    PyObject *po, *result = NULL;
    double lam;
    uint32_t lo;
    Py_buffer p;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Od:threshold_count", kwlist, &po, &lam))
        return NULL;
    if (threshold_key(lam, &lo) < 0 || get_buffer(po, "p", ARG_IN, &p) < 0) return NULL;
    if (check_float32_aligned(&p, "p") == 0 && check_contiguous(&p, "p") == 0) {
        size_t count;
        Py_BEGIN_ALLOW_THREADS
        count = active->count_ge((const float *)p.buf, (size_t)(p.len / 4), lo);
        Py_END_ALLOW_THREADS
        result = PyLong_FromSize_t(count);
    }
    PyBuffer_Release(&p);
    return result;
}

PyDoc_STRVAR(threshold_take_doc,
"threshold_take(p, lam, idx, vals) -> None\n\n"
"Takes every position g of p with |p_g| >= float32(lam) (NaN counts), ascending, as\n"
"topk_take does (idx, vals, p[g] = v - (v as sent)). idx and vals must hold exactly\n"
"threshold_count(p, lam) elements; otherwise ValueError and p is left unchanged.");

static PyObject *py_threshold_take(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"p", "lam", "idx", "vals", NULL};
    PyObject *po, *io, *vo, *result = NULL;
    double lam;
    uint32_t lo;
    Py_buffer v[3] = {{0}};
    sg_take t;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OdOO:threshold_take", kwlist, &po, &lam, &io,
                                     &vo))
        return NULL;
    if (threshold_key(lam, &lo) < 0 || get_memory(po, &v[0]) < 0 ||
        get_pairs(io, vo, &v[0], &v[1], &v[2], &t) < 0)
        goto done;
    size_t found;
    Py_BEGIN_ALLOW_THREADS
    found = sg_threshold_take(active, (size_t)(v[0].len / 4), lo, &t);
    Py_END_ALLOW_THREADS
    if (found != t.cap) {
        PyErr_Format(PyExc_ValueError, "idx and vals have %zu elements, but %zu elements of p "
                     "reach the threshold", t.cap, found);
        goto done;
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    release_all(v, 3);
    return result;
}

PyDoc_STRVAR(sparse_sum_doc,
"sparse_sum(parts, n, out, divisor=1.0) -> int\n\n"
"out[:n] = the sum, in order, of the parts: each (idx, vals) adds vals[j] (float32 or float16,\n"
"widened exactly) at idx[j] (int32; unique within a part for an order-independent result);\n"
"each (None, vals) adds the n float32 vals element-wise. Float32 additions from +0.0, then\n"
"each element divided by float32(divisor) (sparse parts with ascending indices: a block of\n"
"out at a time, with the same bits).\n"
"Returns -1, or, leaving out untouched, the number of the first part with an index outside\n"
"[0, n). out: float32, aligned, C-contiguous, >= n elements, disjoint from the parts.");

/* The sum of sparse_sum's parts into dst (n elements, zeroed here), divided by d: a block of
 * dst at a time when every part is sparse with ascending indices (sg_blocked_sum: the scattered
 * additions and the division hit the cache; at: n_parts cursors), else each step over the
 * whole of dst. */
static void sparse_sum_into(const sg_pairs *parts, size_t n_parts, size_t *at, float *dst,
                            size_t n, float d) {
    int blocked = 1;
    for (size_t r = 0; r < n_parts && blocked; r++)
        blocked = parts[r].idx && sg_ascending(parts[r].idx, parts[r].nnz);
    if (blocked) {
        sg_blocked_sum(parts, n_parts, at, d, dst, n);
        return;
    }
    memset(dst, 0, n * sizeof(float));
    for (size_t r = 0; r < n_parts; r++) {
        if (parts[r].idx) {
            sg_scatter_add(dst, parts[r].idx, parts[r].vals, parts[r].vt, parts[r].nnz);
        } else {
            const uint8_t *src = (const uint8_t *)parts[r].vals;
            for (size_t i = 0; i < n; i++) dst[i] += sg_f32_from_bits(sg_ld32(src + 4 * i));
        }
    }
    sg_divide(dst, n, d);
}

static PyObject *py_sparse_sum(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"parts", "n", "out", "divisor", NULL};
    PyObject *partso, *oo, *seq = NULL, *result = NULL;
    Py_ssize_t n, n_parts = 0, n_views = 0;
    Py_buffer o = {0}, *views = NULL;
    sg_pairs *parts = NULL;
    size_t *at = NULL;
    double divisor = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnO|d:sparse_sum", kwlist, &partso, &n, &oo,
                                     &divisor))
        return NULL;
    if (check_count(n) < 0) return NULL;
    if (!(seq = PySequence_Fast(partso, "parts must be a sequence of (idx, vals) pairs")))
        return NULL;
    n_parts = PySequence_Fast_GET_SIZE(seq);
    views = PyMem_Calloc((size_t)(2 * n_parts + 1), sizeof(Py_buffer));
    parts = PyMem_Calloc((size_t)n_parts + 1, sizeof(sg_pairs));
    at = PyMem_Calloc((size_t)n_parts + 1, sizeof(size_t));
    if (!views || !parts || !at) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_buffer(oo, "out", ARG_OUT, &o) < 0 || check_float32_aligned(&o, "out") < 0 ||
        check_contiguous(&o, "out") < 0 ||
        check_room(o.len / 4, (size_t)n, "out", "elements") < 0)
        goto done;
    for (Py_ssize_t r = 0; r < n_parts; r++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, r);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_Format(PyExc_TypeError, "part %zd must be a tuple (idx or None, vals)", r);
            goto done;
        }
        PyObject *io = PyTuple_GET_ITEM(item, 0), *vo = PyTuple_GET_ITEM(item, 1);
        Py_buffer *vv = &views[n_views++];
        if (get_buffer(vo, "vals", ARG_IN, vv) < 0 || check_contiguous(vv, "vals") < 0) goto done;
        int vt = float_dtype(vv, "vals");
        if (vt < 0) goto done;
        size_t count = (size_t)(vv->len / vv->itemsize);
        if (io == Py_None) {
            if (vt != SG_F32 || count != (size_t)n) {
                PyErr_Format(PyExc_ValueError, "part %zd: a dense part needs n = %zd float32 "
                             "values", r, n);
                goto done;
            }
        } else {
            Py_buffer *iv = &views[n_views++];
            if (vt == SG_BF16) {
                PyErr_SetString(PyExc_TypeError, "vals must be float32 or float16");
                goto done;
            }
            if (get_buffer(io, "idx", ARG_IN, iv) < 0 || check_int_format(iv, "idx", 4) < 0 ||
                check_contiguous(iv, "idx") < 0)
                goto done;
            if ((size_t)(iv->len / 4) != count) {
                PyErr_Format(PyExc_ValueError, "part %zd: idx and vals differ in length", r);
                goto done;
            }
            if (check_disjoint(o.buf, (size_t)n * 4, iv->buf, (size_t)iv->len) < 0) goto done;
            parts[r].idx = iv->buf;
        }
        if (check_disjoint(o.buf, (size_t)n * 4, vv->buf, (size_t)vv->len) < 0) goto done;
        parts[r].vals = vv->buf;
        parts[r].vt = (sg_dtype)vt;
        parts[r].nnz = count;
    }
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < n_parts && bad < 0; r++)
        if (parts[r].idx && !sg_indices_in_range(parts[r].idx, parts[r].nnz, (size_t)n)) bad = r;
    if (bad < 0)
        sparse_sum_into(parts, (size_t)n_parts, at, (float *)o.buf, (size_t)n, (float)divisor);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
done:
    if (views) release_all(views, (int)n_views);
    PyMem_Free(views);
    PyMem_Free(parts);
    PyMem_Free(at);
    if (o.obj) PyBuffer_Release(&o);
    Py_XDECREF(seq);
    return result;
}

/* ---- ef_sign: fused error-feedback scaled sign --------------------------------------------- */

PyDoc_STRVAR(ef_sign_doc,
"ef_sign(g, e, e_out, segments, bits, zplane, scales, zeros) -> bool\n\n"
"Fused error-feedback scaled sign over p = g + e (native/sg_fused.h). g, e, e_out: float32,\n"
"aligned, C-contiguous, n elements each, e_out disjoint from g and e. segments: int64\n"
"(offset, size) pairs, offsets multiples of 8, ascending, non-overlapping, inside [0, n).\n"
"Writes e_out (the new memory), bits and zplane (ceil(n/8) bytes each: sign bits of p, and\n"
"where p is +-0), scales (float32, one per segment) and zeros (int64, one per segment, then\n"
"the gaps' count). Returns False, with the outputs unspecified, if any p or scale is NaN/Inf.");

static int get_f32_vector(PyObject *obj, const char *name, int mode, Py_buffer *v) {
    if (get_buffer(obj, name, mode, v) < 0) return -1;
    return check_float32_aligned(v, name) < 0 || check_contiguous(v, name) < 0 ? -1 : 0;
}

/* ef_sign (n_in = 2: g, e), ef_sign_deferred (n_in = 2: g, p; deferred), ecx_sign (n_in = 3:
 * u, d1, d2) and ecx_sign_deferred (n_in = 3: u, p1, p2; deferred): the arguments are
 * v[0 .. n_in) the inputs, then the new memory, segments, bits, zplane, scales, zeros, then
 * for the deferred kernels one prev_scales per kept buffer (n_in - 1), and alpha for ecx. */
static PyObject *fused_sign(PyObject *args, PyObject *kw, int n_in, int deferred) {
    static char *ef_kwlist[] = {"g", "e", "e_out", "segments", "bits", "zplane", "scales",
                                "zeros", NULL};
    static char *efd_kwlist[] = {"g", "p", "p_out", "segments", "bits", "zplane", "scales",
                                 "zeros", "prev_scales", NULL};
    static char *ecx_kwlist[] = {"u", "d1", "d2", "d_out", "segments", "bits", "zplane",
                                 "scales", "zeros", "alpha", NULL};
    static char *ecxd_kwlist[] = {"u", "p1", "p2", "p_out", "segments", "bits", "zplane",
                                  "scales", "zeros", "prev1", "prev2", "alpha", NULL};
    char **kwlist = n_in == 3 ? (deferred ? ecxd_kwlist : ecx_kwlist)
                              : (deferred ? efd_kwlist : ef_kwlist);
    /* the prev_scales, from index PREV, are inputs: disjoint from the outputs only */
    const int OUT = n_in, SEG = n_in + 1, PREV = n_in + 6, N = PREV + (deferred ? n_in - 1 : 0);
    PyObject *o[11], *result = NULL;
    Py_buffer v[11] = {{0}};
    double alpha = 1.0;
    int64_t *segs = NULL;
    if (n_in == 3 && deferred
            ? !PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOOOOOd:ecx_sign_deferred", kwlist,
                                           &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                                           &o[7], &o[8], &o[9], &o[10], &alpha)
        : n_in == 3
            ? !PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOOOd:ecx_sign", kwlist, &o[0], &o[1],
                                           &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                                           &alpha)
        : deferred
            ? !PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOOO:ef_sign_deferred", kwlist,
                                           &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                                           &o[7], &o[8])
            : !PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOO:ef_sign", kwlist, &o[0], &o[1],
                                           &o[2], &o[3], &o[4], &o[5], &o[6], &o[7]))
        return NULL;
    for (int k = PREV; k < N; k++)
        if (get_f32_vector(o[k], kwlist[k], ARG_IN, &v[k]) < 0) goto done;
    if (!(alpha > 0.0 && alpha <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "alpha must be in (0, 1]");
        goto done;
    }
    for (int k = 0; k < n_in; k++)
        if (get_f32_vector(o[k], kwlist[k], ARG_IN, &v[k]) < 0) goto done;
    if (get_f32_vector(o[OUT], kwlist[OUT], ARG_OUT, &v[OUT]) < 0 ||
        get_buffer(o[SEG], "segments", ARG_IN, &v[SEG]) < 0 ||
        check_int_format(&v[SEG], "segments", 8) < 0 ||
        check_contiguous(&v[SEG], "segments") < 0 ||
        get_buffer(o[SEG + 1], "bits", ARG_OUT, &v[SEG + 1]) < 0 ||
        check_bytes_format(&v[SEG + 1], "bits") < 0 || check_contiguous(&v[SEG + 1], "bits") < 0 ||
        get_buffer(o[SEG + 2], "zplane", ARG_OUT, &v[SEG + 2]) < 0 ||
        check_bytes_format(&v[SEG + 2], "zplane") < 0 ||
        check_contiguous(&v[SEG + 2], "zplane") < 0 ||
        get_f32_vector(o[SEG + 3], "scales", ARG_OUT, &v[SEG + 3]) < 0 ||
        get_buffer(o[SEG + 4], "zeros", ARG_OUT, &v[SEG + 4]) < 0 ||
        check_int_format(&v[SEG + 4], "zeros", 8) < 0 || check_contiguous(&v[SEG + 4], "zeros") < 0)
        goto done;
    size_t n = (size_t)(v[0].len / 4), n_segs = (size_t)(v[SEG].len / 16), end = 0;
    int same = v[SEG].len % 16 == 0;
    for (int k = 1; k <= OUT; k++) same &= v[k].len == v[0].len;
    if (!same) {
        PyErr_Format(PyExc_ValueError, "%s must have the same length, segments (offset, size) "
                     "pairs", n_in == 2 ? (deferred ? "g, p and p_out" : "g, e and e_out")
                                        : (deferred ? "u, p1, p2 and p_out"
                                                    : "u, d1, d2 and d_out"));
        goto done;
    }
    if (n > ((size_t)1 << 31)) {
        PyErr_SetString(PyExc_ValueError, "more than 2**31 elements");
        goto done;
    }
    if (check_room(v[SEG + 1].len, sg_nbytes(n), "bits", "bytes") < 0 ||
        check_room(v[SEG + 2].len, sg_nbytes(n), "zplane", "bytes") < 0 ||
        check_room(v[SEG + 3].len / 4, n_segs, "scales", "elements") < 0 ||
        check_room(v[SEG + 4].len / 8, n_segs + 1, "zeros", "elements") < 0)
        goto done;
    for (int k = PREV; k < N; k++)
        if (check_room(v[k].len / 4, n_segs, kwlist[k], "elements") < 0) goto done;
    /* every output disjoint from everything else (the inputs, prev_scales included, may
     * alias each other) */
    for (int a = 0; a < N; a++)
        for (int b = a + 1; b < N; b++) {
            int output = a == OUT || (a > SEG && a < PREV) || b == OUT || (b > SEG && b < PREV);
            if (output && a != SEG && b != SEG &&
                check_disjoint(v[a].buf, (size_t)v[a].len, v[b].buf, (size_t)v[b].len) < 0)
                goto done;
        }
    if (check_disjoint(v[SEG].buf, (size_t)v[SEG].len, v[OUT].buf, (size_t)v[OUT].len) < 0)
        goto done;
    segs = PyMem_Malloc(v[SEG].len ? (size_t)v[SEG].len : 1);
    if (!segs) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(segs, v[SEG].buf, (size_t)v[SEG].len);   /* copied: unaligned buffers are allowed */
    for (size_t t = 0; t < n_segs; t++) {
        int64_t off = segs[2 * t], size = segs[2 * t + 1];
        if (off < 0 || size < 0 || off % 8 != 0 || (size_t)off < end || (size_t)size > n ||
            (size_t)off > n - (size_t)size) {
            PyErr_Format(PyExc_ValueError, "segment %zu (offset %lld, size %lld): need offsets "
                         "that are multiples of 8 and ascending, non-overlapping ranges inside "
                         "[0, %zu)", t, (long long)off, (long long)size, n);
            goto done;
        }
        end = (size_t)(off + size);
    }
    int ok;
    float *out = (float *)v[OUT].buf, *scales = (float *)v[SEG + 3].buf;
    uint8_t *bits = (uint8_t *)v[SEG + 1].buf, *zplane = (uint8_t *)v[SEG + 2].buf;
    uint64_t *zeros = (uint64_t *)v[SEG + 4].buf;
    /* the coefficients rounded once to float32 (the torch fallback does the same) */
    float ca = (float)(2.0 - alpha), cb = (float)(1.0 - alpha);
    Py_BEGIN_ALLOW_THREADS
    if (deferred && n_in == 3)
        ok = active->ecx_sign_deferred((const float *)v[0].buf, (const float *)v[1].buf,
                                       (const float *)v[PREV].buf, (const float *)v[2].buf,
                                       (const float *)v[PREV + 1].buf, ca, cb, out, n, segs,
                                       n_segs, bits, zplane, scales, zeros);
    else if (deferred)
        ok = active->ef_sign_deferred((const float *)v[0].buf, (const float *)v[1].buf,
                                      (const float *)v[PREV].buf, out, n, segs, n_segs, bits,
                                      zplane, scales, zeros);
    else if (n_in == 2)
        ok = active->ef_sign((const float *)v[0].buf, (const float *)v[1].buf, out, n, segs,
                             n_segs, bits, zplane, scales, zeros);
    else
        ok = active->ecx_sign((const float *)v[0].buf, (const float *)v[1].buf,
                              (const float *)v[2].buf, ca, cb, out, n, segs, n_segs, bits,
                              zplane, scales, zeros);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(ok);
done:
    PyMem_Free(segs);
    release_all(v, N);
    return result;
}

static PyObject *py_ef_sign(PyObject *self, PyObject *args, PyObject *kw) {
    return fused_sign(args, kw, 2, 0);
}

PyDoc_STRVAR(ef_sign_deferred_doc,
"ef_sign_deferred(g, p, p_out, segments, bits, zplane, scales, zeros, prev_scales) -> bool\n\n"
"ef_sign in one pass, with the memory kept as the last step's p and its scales\n"
"(native/sg_fused.h): e = p - copysign(prev_scales[t], p) where p is not +-0 in segment t,\n"
"e = p elsewhere; p_out <- g + e, and the other outputs are ef_sign's over g + e. g, p, p_out\n"
"and segments as ef_sign's g, e, e_out and segments; prev_scales: float32, one per segment,\n"
"disjoint from the outputs. Returns False, the outputs unspecified, if any p or scale is\n"
"NaN/Inf.");

static PyObject *py_ef_sign_deferred(PyObject *self, PyObject *args, PyObject *kw) {
    return fused_sign(args, kw, 2, 1);
}

/* ---- ecx_sign: fused ErrorCompensatedX scaled sign ---------------------------------------- */

PyDoc_STRVAR(ecx_sign_doc,
"ecx_sign(u, d1, d2, d_out, segments, bits, zplane, scales, zeros, alpha) -> bool\n\n"
"As ef_sign over p = u + (a*d1 - b*d2), a = float32(2 - alpha), b = float32(1 - alpha),\n"
"each operation rounded to float32 in that order (ErrorCompensatedX: d1, d2 the errors of\n"
"the two previous steps). u, d1, d2, d_out: float32, aligned, C-contiguous, n elements each,\n"
"d_out disjoint from the others; 0 < alpha <= 1. d_out <- the new error p - q. Returns False,\n"
"the outputs unspecified, if any p or scale is NaN/Inf (any NaN/Inf input makes p so).");

static PyObject *py_ecx_sign(PyObject *self, PyObject *args, PyObject *kw) {
    return fused_sign(args, kw, 3, 0);
}

PyDoc_STRVAR(ecx_sign_deferred_doc,
"ecx_sign_deferred(u, p1, p2, p_out, segments, bits, zplane, scales, zeros, prev1, prev2,\n"
"                  alpha) -> bool\n\n"
"ecx_sign in one pass, with both memories kept as earlier steps' p and their scales\n"
"(native/sg_fused.h): d1, d2 are the residuals of p1 with prev1 and of p2 with prev2 (as\n"
"ef_sign_deferred forms e); p_out <- u + (a*d1 - b*d2), and the other outputs are ecx_sign's\n"
"over it. prev1, prev2: float32, one per segment, disjoint from the outputs.\n"
"Returns False, the outputs unspecified, if any p or scale is NaN/Inf.");

static PyObject *py_ecx_sign_deferred(PyObject *self, PyObject *args, PyObject *kw) {
    return fused_sign(args, kw, 3, 1);
}

/* ---- momentum_sign / momentum_absmax: fused Signum / SSDM momentum ------------------------ */

PyDoc_STRVAR(momentum_sign_doc,
"momentum_sign(g, m, m_out, beta, bits, zplane) -> int or None\n\n"
"Fused Signum momentum (native/sg_momentum.h): m_out = (a * m) + (b * g) with\n"
"a = float32(beta), b = float32(1 - beta), each operation rounded in float32 (no FMA).\n"
"g, m, m_out: float32, aligned, C-contiguous, n <= 2**31 elements each, m_out disjoint from\n"
"g and m. Writes m_out, bits and zplane (ceil(n/8) bytes each: sign bits of m_out, and where\n"
"m_out is +-0) and returns the number of +-0 in m_out; None, with the outputs unspecified,\n"
"if any m_out is NaN/Inf (g and m are only read).");

PyDoc_STRVAR(momentum_absmax_doc,
"momentum_absmax(g, m, m_out, beta) -> (absmax, zeros) or None\n\n"
"Fused SSDM momentum: m_out as momentum_sign's, and max |m_out_i| (a float, 0.0 for n = 0)\n"
"and the number of +-0 in m_out; None, with m_out unspecified, if any m_out is NaN/Inf.");

/* Two float32 input vectors and an output vector of the same length (at most 2**31), the
 * output disjoint from both: v[0], v[1], v[2] from o[0 .. 3) named names[0 .. 3). */
static int two_in_one_out(PyObject **o, char **names, Py_buffer *v, size_t *n) {
    if (get_f32_vector(o[0], names[0], ARG_IN, &v[0]) < 0 ||
        get_f32_vector(o[1], names[1], ARG_IN, &v[1]) < 0 ||
        get_f32_vector(o[2], names[2], ARG_OUT, &v[2]) < 0)
        return -1;
    if (v[1].len != v[0].len || v[2].len != v[0].len) {
        PyErr_Format(PyExc_ValueError, "%s, %s and %s must have the same length", names[0],
                     names[1], names[2]);
        return -1;
    }
    *n = (size_t)(v[0].len / 4);
    if (*n > ((size_t)1 << 31)) {
        PyErr_SetString(PyExc_ValueError, "more than 2**31 elements");
        return -1;
    }
    return check_disjoint(v[2].buf, (size_t)v[2].len, v[0].buf, (size_t)v[0].len) < 0 ||
           check_disjoint(v[2].buf, (size_t)v[2].len, v[1].buf, (size_t)v[1].len) < 0 ? -1 : 0;
}

/* g, m, m_out: the float32 vectors; fills *n and (a, b) from beta. */
static int momentum_args(PyObject **o, double beta, Py_buffer *v, size_t *n, float *a,
                         float *b) {
    static char *names[] = {"g", "m", "m_out"};
    if (two_in_one_out(o, names, v, n) < 0) return -1;
    if (!isfinite(beta)) {
        PyErr_SetString(PyExc_ValueError, "beta must be finite");
        return -1;
    }
    *a = (float)beta;
    *b = (float)(1.0 - beta);
    return 0;
}

static PyObject *py_momentum_sign(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"g", "m", "m_out", "beta", "bits", "zplane", NULL};
    PyObject *o[5], *result = NULL;
    Py_buffer v[5] = {{0}};   /* g, m, m_out, bits, zplane */
    double beta;
    size_t n, zeros = 0;
    float a, b;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOdOO:momentum_sign", kwlist, &o[0], &o[1],
                                     &o[2], &beta, &o[3], &o[4]))
        return NULL;
    if (momentum_args(o, beta, v, &n, &a, &b) < 0 ||
        get_buffer(o[3], "bits", ARG_OUT, &v[3]) < 0 || check_bytes_format(&v[3], "bits") < 0 ||
        check_contiguous(&v[3], "bits") < 0 || get_buffer(o[4], "zplane", ARG_OUT, &v[4]) < 0 ||
        check_bytes_format(&v[4], "zplane") < 0 || check_contiguous(&v[4], "zplane") < 0 ||
        check_room(v[3].len, sg_nbytes(n), "bits", "bytes") < 0 ||
        check_room(v[4].len, sg_nbytes(n), "zplane", "bytes") < 0)
        goto done;
    for (int x = 3; x < 5; x++)
        for (int y = 0; y < x; y++)
            if (check_disjoint(v[x].buf, (size_t)v[x].len, v[y].buf, (size_t)v[y].len) < 0)
                goto done;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = active->momentum_sign((const float *)v[0].buf, (const float *)v[1].buf,
                               (float *)v[2].buf, n, a, b, (uint8_t *)v[3].buf,
                               (uint8_t *)v[4].buf, &zeros);
    Py_END_ALLOW_THREADS
    if (ok) {
        result = PyLong_FromSize_t(zeros);
    } else {
        Py_INCREF(Py_None);
        result = Py_None;
    }
done:
    release_all(v, 5);
    return result;
}

static PyObject *py_momentum_absmax(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"g", "m", "m_out", "beta", NULL};
    PyObject *o[3], *result = NULL;
    Py_buffer v[3] = {{0}};   /* g, m, m_out */
    double beta;
    size_t n, zeros = 0;
    float a, b, absmax = 0.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOd:momentum_absmax", kwlist, &o[0], &o[1],
                                     &o[2], &beta))
        return NULL;
    if (momentum_args(o, beta, v, &n, &a, &b) < 0) goto done;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = active->momentum_absmax((const float *)v[0].buf, (const float *)v[1].buf,
                                 (float *)v[2].buf, n, a, b, &absmax, &zeros);
    Py_END_ALLOW_THREADS
    if (ok) {
        result = Py_BuildValue("(dn)", (double)absmax, (Py_ssize_t)zeros);
    } else {
        Py_INCREF(Py_None);
        result = Py_None;
    }
done:
    release_all(v, 3);
    return result;
}

PyDoc_STRVAR(add_finite_doc,
"add_finite(a, b, out) -> bool\n\n"
"out = a + b (float32, rounded per element); True when every sum is finite (out is written\n"
"either way). a, b, out: float32 vectors of one length, out disjoint from a and b.");

static PyObject *py_add_finite(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"a", "b", "out", NULL};
    PyObject *o[3], *result = NULL;
    Py_buffer v[3] = {{0}};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:add_finite", kwlist, &o[0], &o[1], &o[2]))
        return NULL;
    size_t n;
    if (two_in_one_out(o, kwlist, v, &n) < 0) goto done;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = active->add_finite((const float *)v[0].buf, (const float *)v[1].buf, (float *)v[2].buf, n);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(ok);
done:
    release_all(v, 3);
    return result;
}

PyDoc_STRVAR(sign_scan_doc,
"sign_scan(x, bits, zplane) -> zeros or None\n\n"
"signSGD's encode in one pass: the sign bits of the float32 vector x and the bitplane of\n"
"x == +-0 (pack_signs layout, ceil(n/8) bytes each) and the number of +-0; None, with bits\n"
"and zplane unspecified, if any x is NaN/Inf.");

static PyObject *py_sign_scan(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "bits", "zplane", NULL};
    PyObject *o[3], *result = NULL;
    Py_buffer v[3] = {{0}};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:sign_scan", kwlist, &o[0], &o[1], &o[2]))
        return NULL;
    if (get_f32_vector(o[0], "x", ARG_IN, &v[0]) < 0) goto done;
    size_t n = (size_t)(v[0].len / 4), zeros = 0;
    if (get_buffer(o[1], "bits", ARG_OUT, &v[1]) < 0 || check_bytes_format(&v[1], "bits") < 0 ||
        check_contiguous(&v[1], "bits") < 0 || get_buffer(o[2], "zplane", ARG_OUT, &v[2]) < 0 ||
        check_bytes_format(&v[2], "zplane") < 0 || check_contiguous(&v[2], "zplane") < 0 ||
        check_room(v[1].len, sg_nbytes(n), "bits", "bytes") < 0 ||
        check_room(v[2].len, sg_nbytes(n), "zplane", "bytes") < 0 ||
        check_disjoint(v[1].buf, sg_nbytes(n), v[2].buf, sg_nbytes(n)) < 0 ||
        check_disjoint(v[1].buf, sg_nbytes(n), v[0].buf, (size_t)v[0].len) < 0 ||
        check_disjoint(v[2].buf, sg_nbytes(n), v[0].buf, (size_t)v[0].len) < 0)
        goto done;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = active->sign_scan((const float *)v[0].buf, n, (uint8_t *)v[1].buf, (uint8_t *)v[2].buf,
                           &zeros);
    Py_END_ALLOW_THREADS
    if (ok) {
        result = PyLong_FromSize_t(zeros);
    } else {
        Py_INCREF(Py_None);
        result = Py_None;
    }
done:
    release_all(v, 3);
    return result;
}

PyDoc_STRVAR(scaled_vote_doc,
"scaled_vote(gathered, segments, weights, out, zeros=None) -> None\n\n"
"vote(mode='sum') segment by segment in one call: for segment t, (offset, size) pair t of\n"
"the int64 buffer segments (offsets multiples of 8, ascending, non-overlapping, inside out),\n"
"out[offset + i] = sum_m weights[t, m] s_m, float32 additions from +0.0 in rank order, s_m\n"
"from bit offset + i of rank m's row. gathered: uint8 2-D (n_ranks, >= ceil(end / 8)) with\n"
"unit stride in a row; weights: float32, aligned, C-contiguous, S * n_ranks values; out:\n"
"float32, aligned, C-contiguous, disjoint from the inputs. Elements outside the segments are\n"
"not written. zeros: None, or the ranks' zero planes, uint8 2-D (n_ranks, >= ceil(end / 8))\n"
"with unit stride in a row: where rank m's plane has bit offset + i set, its term is +0.0.");

/* The segments as (offset, size) pairs checked against out's length and the rows' bytes. */
static int64_t *scaled_vote_segments(const Py_buffer *sv, size_t n_out, Py_ssize_t row_len,
                                     size_t *n_segs) {
    if (sv->len % 16 != 0) {
        PyErr_SetString(PyExc_ValueError, "segments must hold (offset, size) pairs");
        return NULL;
    }
    *n_segs = (size_t)(sv->len / 16);
    int64_t *segs = PyMem_Malloc(sv->len ? (size_t)sv->len : 1);
    if (!segs) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(segs, sv->buf, (size_t)sv->len);
    uint64_t end = 0;
    for (size_t t = 0; t < *n_segs; t++) {
        int64_t o = segs[2 * t], sz = segs[2 * t + 1];
        if (o < 0 || sz < 0 || o % 8 != 0 || (uint64_t)o < end || (uint64_t)o + (uint64_t)sz > n_out ||
            sg_nbytes((size_t)(o + sz)) > (size_t)row_len) {
            PyErr_Format(PyExc_ValueError, "segment %zu (%lld, %lld) is not an ascending, "
                         "8-aligned range inside out and the rows", t, (long long)o, (long long)sz);
            PyMem_Free(segs);
            return NULL;
        }
        end = (uint64_t)(o + sz);
    }
    return segs;
}

/* scaled_vote's zeros: a uint8 2-D buffer with one row per rank and unit stride in a row. */
static int zero_planes(const Py_buffer *z, size_t n_ranks, sg_rows *planes, Py_ssize_t *row_len) {
    if (z->ndim != 2 || (size_t)z->shape[0] != n_ranks) {
        PyErr_Format(PyExc_ValueError, "zeros must be 2-D with one row per rank (%zu)", n_ranks);
        return -1;
    }
    if (z->shape[1] > 1 && z->strides[1] != 1) {
        PyErr_SetString(PyExc_ValueError, "zeros rows must have unit stride");
        return -1;
    }
    planes->base = (const uint8_t *)z->buf;
    planes->stride = z->strides[0];
    planes->n_ranks = n_ranks;
    *row_len = z->shape[1];
    return 0;
}

static PyObject *py_scaled_vote(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"gathered", "segments", "weights", "out", "zeros", NULL};
    PyObject *go, *so, *wo, *oo, *zo = Py_None, *result = NULL;
    Py_buffer g = {0}, sv = {0}, wv = {0}, o = {0}, zv = {0};
    int64_t *segs = NULL;
    sg_rows rows, zrows = {NULL, 0, 0};
    Py_ssize_t row_len, zrow_len = 0;
    size_t n_segs = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|O:scaled_vote", kwlist, &go, &so, &wo, &oo,
                                     &zo))
        return NULL;
    if (get_buffer(go, "gathered", ARG_IN, &g) < 0) return NULL;
    if (check_bytes_format(&g, "gathered") < 0 || gathered_rows(&g, -1, &rows, &row_len) < 0 ||
        get_buffer(so, "segments", ARG_IN, &sv) < 0 || check_int_format(&sv, "segments", 8) < 0 ||
        check_contiguous(&sv, "segments") < 0 || get_f32_vector(wo, "weights", ARG_IN, &wv) < 0 ||
        get_f32_vector(oo, "out", ARG_OUT, &o) < 0)
        goto done;
    size_t n_out = (size_t)(o.len / 4);
    const int have_zeros = zo != Py_None;
    if (have_zeros &&
        (get_buffer(zo, "zeros", ARG_IN, &zv) < 0 || check_bytes_format(&zv, "zeros") < 0 ||
         zero_planes(&zv, rows.n_ranks, &zrows, &zrow_len) < 0))
        goto done;
    if ((segs = scaled_vote_segments(&sv, n_out, row_len, &n_segs)) == NULL) goto done;
    /* the last segment ends last */
    size_t z_need = n_segs ? sg_nbytes((size_t)(segs[2 * n_segs - 2] + segs[2 * n_segs - 1])) : 0;
    if (have_zeros && z_need > (size_t)zrow_len) {
        PyErr_Format(PyExc_ValueError, "zeros rows have %zd bytes, need %zu", zrow_len, z_need);
        goto done;
    }
    if ((size_t)(wv.len / 4) != n_segs * rows.n_ranks) {
        PyErr_Format(PyExc_ValueError, "weights has %zd values, need segments x n_ranks = %zu",
                     wv.len / 4, n_segs * rows.n_ranks);
        goto done;
    }
    uintptr_t lo;
    size_t extent;
    rows_extent(&rows, (size_t)row_len, &lo, &extent);
    if (check_disjoint((const void *)lo, row_len ? extent : 0, o.buf, (size_t)o.len) < 0 ||
        check_disjoint(wv.buf, (size_t)wv.len, o.buf, (size_t)o.len) < 0 ||
        check_disjoint(sv.buf, (size_t)sv.len, o.buf, (size_t)o.len) < 0)
        goto done;
    if (have_zeros) {
        rows_extent(&zrows, (size_t)zrow_len, &lo, &extent);
        if (check_disjoint((const void *)lo, zrow_len ? extent : 0, o.buf, (size_t)o.len) < 0)
            goto done;
    }
    const float *w = (const float *)wv.buf;
    float *dst = (float *)o.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t t = 0; t < n_segs; t++) {
        size_t off = (size_t)segs[2 * t], sz = (size_t)segs[2 * t + 1];
        if (sz == 0) continue;
        sg_rows seg = {rows.base + off / 8, rows.stride, rows.n_ranks};
        sg_rows zseg = {have_zeros ? zrows.base + off / 8 : NULL, have_zeros ? zrows.stride : 0,
                        rows.n_ranks};
        active->vote_weighted(&seg, have_zeros ? &zseg : NULL, sz, w + t * rows.n_ranks, 0,
                              dst + off);
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyMem_Free(segs);
    if (zv.obj) PyBuffer_Release(&zv);
    if (o.obj) PyBuffer_Release(&o);
    if (wv.obj) PyBuffer_Release(&wv);
    if (sv.obj) PyBuffer_Release(&sv);
    PyBuffer_Release(&g);
    return result;
}

/* ---- module ------------------------------------------------------------------------------ */

static PyMethodDef methods[] = {
    {"pack_signs", (PyCFunction)(void (*)(void))py_pack_signs, METH_VARARGS | METH_KEYWORDS,
     pack_signs_doc},
    {"pack_stochastic_signs", (PyCFunction)(void (*)(void))py_pack_stochastic_signs,
     METH_VARARGS | METH_KEYWORDS, pack_stochastic_signs_doc},
    {"unpack_signs", (PyCFunction)(void (*)(void))py_unpack_signs, METH_VARARGS | METH_KEYWORDS,
     unpack_signs_doc},
    {"vote", (PyCFunction)(void (*)(void))py_vote, METH_VARARGS | METH_KEYWORDS, vote_doc},
    {"scaled_vote", (PyCFunction)(void (*)(void))py_scaled_vote, METH_VARARGS | METH_KEYWORDS,
     scaled_vote_doc},
    {"topk_take", (PyCFunction)(void (*)(void))py_topk_take, METH_VARARGS | METH_KEYWORDS,
     topk_take_doc},
    {"topk_take_sum", (PyCFunction)(void (*)(void))py_topk_take_sum,
     METH_VARARGS | METH_KEYWORDS, topk_take_sum_doc},
    {"threshold_count", (PyCFunction)(void (*)(void))py_threshold_count,
     METH_VARARGS | METH_KEYWORDS, threshold_count_doc},
    {"threshold_take", (PyCFunction)(void (*)(void))py_threshold_take,
     METH_VARARGS | METH_KEYWORDS, threshold_take_doc},
    {"sparse_sum", (PyCFunction)(void (*)(void))py_sparse_sum, METH_VARARGS | METH_KEYWORDS,
     sparse_sum_doc},
    {"ef_sign", (PyCFunction)(void (*)(void))py_ef_sign, METH_VARARGS | METH_KEYWORDS,
     ef_sign_doc},
    {"ef_sign_deferred", (PyCFunction)(void (*)(void))py_ef_sign_deferred,
     METH_VARARGS | METH_KEYWORDS, ef_sign_deferred_doc},
    {"ecx_sign", (PyCFunction)(void (*)(void))py_ecx_sign, METH_VARARGS | METH_KEYWORDS,
     ecx_sign_doc},
    {"ecx_sign_deferred", (PyCFunction)(void (*)(void))py_ecx_sign_deferred,
     METH_VARARGS | METH_KEYWORDS, ecx_sign_deferred_doc},
    {"momentum_sign", (PyCFunction)(void (*)(void))py_momentum_sign,
     METH_VARARGS | METH_KEYWORDS, momentum_sign_doc},
    {"momentum_absmax", (PyCFunction)(void (*)(void))py_momentum_absmax,
     METH_VARARGS | METH_KEYWORDS, momentum_absmax_doc},
    {"add_finite", (PyCFunction)(void (*)(void))py_add_finite, METH_VARARGS | METH_KEYWORDS,
     add_finite_doc},
    {"sign_scan", (PyCFunction)(void (*)(void))py_sign_scan, METH_VARARGS | METH_KEYWORDS,
     sign_scan_doc},
    {"count_zeros", py_count_zeros, METH_VARARGS, count_zeros_doc},
    {"isa", py_isa, METH_NOARGS, "isa() -> name of the active kernel set"},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name) -> previous name; name: 'auto', 'portable' or 'avx2' (for tests)"},
    {"available_isas", py_available_isas, METH_NOARGS,
     "available_isas() -> tuple of the kernel sets this CPU can run"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_native",
    .m_doc = "Native sign packing, voting and sparse (Top-k) kernels of hvd_signsgd (see hvd_signsgd.kernels).\n"
             "HVD_SIGNSGD_NATIVE_ISA=auto|portable|avx2 picks the kernel set at import.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    const char *isa = getenv("HVD_SIGNSGD_NATIVE_ISA");
    if (select_isa(isa ? isa : "auto") < 0) return NULL;
    return PyModule_Create(&module);
}
