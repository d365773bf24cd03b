/*
 * Optional accelerator of IDE TLP protection (PCIe 6.x §6.33.4-§6.33.6): AES-GCM-256 with
 * a 96-bit MAC over runs of TLPs, one invocation per TLP or per aggregated unit, through
 * the system OpenSSL's libcrypto (EVP).  The pure-Python functions in teeio/ide_runs.py
 * are the reference: these produce and accept byte for byte what they do (the unit tests
 * compare them).  Built at install time when a compiler and the OpenSSL headers are
 * there; teeio/ide_accel.py falls back to the reference otherwise.
 *
 *   Gcm(key: bytes)                      one key, its AES key schedule made once
 *   Gcm.seal(counter, prefix, headers, payloads, unit_tlps) -> (wires, units)
 *   Gcm.open(wires, start, stop, counter, unit_tlps, joined=False)
 *       -> (plaintexts, consumed, units)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/crypto.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <stdint.h>
#include <string.h>

#define KEY_LEN 32
#define IV_LEN 12
#define MAC_LEN 12
#define PREFIX_LEN 4
#define UNIT_PAYLOAD_MAX 1024   /* §6.33.6: at most 256 DW of payload per aggregated unit */
#define UNIT_TLPS_MAX 8         /* §6.33.6: at most 8 TLPs per aggregated unit */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx;
} GcmObject;

static PyObject *empty_bytes;

static void
iv_of(unsigned char iv[IV_LEN], uint64_t counter)
{
    /* §6.33.5: 32 zero bits, then the 64-bit invocation counter, big-endian */
    memset(iv, 0, 4);
    for (int i = 0; i < 8; i++)
        iv[4 + i] = (unsigned char)(counter >> (56 - 8 * i));
}

static int
gcm_start(GcmObject *self, uint64_t counter, int enc)
{
    unsigned char iv[IV_LEN];
    iv_of(iv, counter);
    return EVP_CipherInit_ex2(self->ctx, NULL, NULL, iv, enc, NULL) == 1;
}

/* The unit's MAC: the GCM tag's 12 leading bytes (§6.33.5), after the last data. */
static int
gcm_get_mac(GcmObject *self, unsigned char mac[MAC_LEN])
{
    int outl;
    OSSL_PARAM params[2];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, mac, MAC_LEN);
    params[1] = OSSL_PARAM_construct_end();
    return EVP_EncryptFinal_ex(self->ctx, mac, &outl) == 1
        && EVP_CIPHER_CTX_get_params(self->ctx, params) == 1;
}

/* Whether the unit's MAC checks out (constant time, in libcrypto), after the last data. */
static int
gcm_check_mac(GcmObject *self, const unsigned char *mac)
{
    int outl;
    unsigned char tmp[16];
    OSSL_PARAM params[2];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, (void *)mac,
                                                  MAC_LEN);
    params[1] = OSSL_PARAM_construct_end();
    return EVP_CIPHER_CTX_set_params(self->ctx, params) == 1
        && EVP_DecryptFinal_ex(self->ctx, tmp, &outl) == 1;
}

static int
gcm_aad(GcmObject *self, const unsigned char *p, Py_ssize_t n)
{
    int outl;
    if (n == 0)
        return 1;
    return EVP_CipherUpdate(self->ctx, NULL, &outl, p, (int)n) == 1;
}

static int
gcm_data(GcmObject *self, unsigned char *out, const unsigned char *in, Py_ssize_t n)
{
    int outl;
    if (n == 0)
        return 1;
    return EVP_CipherUpdate(self->ctx, out, &outl, in, (int)n) == 1 && outl == n;
}

static PyObject *
Gcm_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_buffer key;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Gcm() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*:Gcm", &key))
        return NULL;
    if (key.len != KEY_LEN) {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "IDE key must be %d bytes", KEY_LEN);
        return NULL;
    }
    GcmObject *self = (GcmObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyBuffer_Release(&key);
        return NULL;
    }
    self->ctx = EVP_CIPHER_CTX_new();
    int ok = self->ctx != NULL
        && EVP_EncryptInit_ex(self->ctx, EVP_aes_256_gcm(), NULL, key.buf, NULL) == 1;
    PyBuffer_Release(&key);
    if (!ok) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL: AES-256-GCM set-up failed");
        return NULL;
    }
    return (PyObject *)self;
}

static void
Gcm_dealloc(GcmObject *self)
{
    if (self->ctx != NULL)
        EVP_CIPHER_CTX_free(self->ctx);     /* cleanses the key schedule */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A bytes-like object's memory: an exact bytes object's own (borrowed: the list that holds
 * it keeps it, and no Python code runs while it is used), else its buffer (obj set, to be
 * released).  0 if it has none. */
static int
get_view(PyObject *o, Py_buffer *v)
{
    if (PyBytes_CheckExact(o)) {
        v->buf = PyBytes_AS_STRING(o);
        v->len = PyBytes_GET_SIZE(o);
        v->obj = NULL;
        return 1;
    }
    if (PyObject_GetBuffer(o, v, PyBUF_SIMPLE) < 0) {
        v->obj = NULL;
        return 0;
    }
    return 1;
}

static void
release_view(Py_buffer *v)
{
    if (v->obj != NULL)
        PyBuffer_Release(v);
    v->obj = NULL;
}

/* The buffers of a list of bytes-like objects (released by release_all). */
typedef struct {
    Py_ssize_t n;
    Py_buffer *views;
} Views;

static void
release_all(Views *v)
{
    if (v->views == NULL)
        return;
    for (Py_ssize_t i = 0; i < v->n; i++)
        release_view(&v->views[i]);
    PyMem_Free(v->views);
    v->views = NULL;
}

static int
get_all(PyObject *seq, Views *v, const char *what)
{
    v->n = PyList_GET_SIZE(seq);
    v->views = PyMem_Calloc(v->n ? v->n : 1, sizeof(Py_buffer));
    if (v->views == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    for (Py_ssize_t i = 0; i < v->n; i++) {
        if (!get_view(PyList_GET_ITEM(seq, i), &v->views[i])) {
            PyErr_Format(PyExc_TypeError, "%s[%zd] is not a contiguous bytes-like object",
                         what, i);
            release_all(v);
            return 0;
        }
    }
    return 1;
}

/* seal(counter, prefix, headers, payloads, unit_tlps) -> (wires, units)
 *
 * Units as teeio.ide_runs.seal_units forms them: consecutive TLPs, at most unit_tlps of
 * them, whose payloads add up to at most 256 DW (a single TLP of any size is a unit).  Each
 * TLP's wire is prefix (M clear but on the unit's last TLP) || header || its slice of the
 * unit's ciphertext, the unit's last one followed by the 96-bit MAC over A = every
 * prefix || header of the unit and P = every payload (§6.33.4, §6.33.6). */
static PyObject *
Gcm_seal(GcmObject *self, PyObject *args)
{
    unsigned long long counter;
    Py_buffer prefix;
    PyObject *headers, *payloads;
    int unit_tlps;
    if (!PyArg_ParseTuple(args, "Ky*O!O!i:seal", &counter, &prefix, &PyList_Type, &headers,
                          &PyList_Type, &payloads, &unit_tlps))
        return NULL;
    PyObject *result = NULL, *wires = NULL;
    Views hv = {0, NULL}, pv = {0, NULL};
    if (prefix.len != PREFIX_LEN || unit_tlps < 1 || unit_tlps > UNIT_TLPS_MAX
            || PyList_GET_SIZE(headers) != PyList_GET_SIZE(payloads)) {
        PyErr_SetString(PyExc_ValueError, "seal: bad prefix, unit size or list lengths");
        goto done;
    }
    if (!get_all(headers, &hv, "headers") || !get_all(payloads, &pv, "payloads"))
        goto done;
    Py_ssize_t n = hv.n;
    wires = PyList_New(n);
    if (wires == NULL)
        goto done;
    unsigned char last_prefix[PREFIX_LEN], inner_prefix[PREFIX_LEN];
    memcpy(last_prefix, prefix.buf, PREFIX_LEN);
    memcpy(inner_prefix, prefix.buf, PREFIX_LEN);
    last_prefix[1] |= 1;                    /* M: this TLP carries the unit's MAC */
    inner_prefix[1] &= 0xFE;
    uint64_t ctr = counter;
    Py_ssize_t units = 0;
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t j = i + 1, total = pv.views[i].len;
        while (j < n && j - i < unit_tlps && total + pv.views[j].len <= UNIT_PAYLOAD_MAX)
            total += pv.views[j++].len;
        if (!gcm_start(self, ctr, 1))
            goto crypto_error;
        for (Py_ssize_t k = i; k < j; k++) {
            unsigned char aad[PREFIX_LEN + 16];     /* prefix || header, one update */
            Py_ssize_t hlen = hv.views[k].len;
            memcpy(aad, k == j - 1 ? last_prefix : inner_prefix, PREFIX_LEN);
            if (hlen <= 16) {
                memcpy(aad + PREFIX_LEN, hv.views[k].buf, hlen);
                if (!gcm_aad(self, aad, PREFIX_LEN + hlen))
                    goto crypto_error;
            } else if (!gcm_aad(self, aad, PREFIX_LEN)
                       || !gcm_aad(self, hv.views[k].buf, hlen)) {
                goto crypto_error;
            }
        }
        for (Py_ssize_t k = i; k < j; k++) {
            Py_ssize_t hlen = hv.views[k].len, plen = pv.views[k].len;
            PyObject *w = PyBytes_FromStringAndSize(
                NULL, PREFIX_LEN + hlen + plen + (k == j - 1 ? MAC_LEN : 0));
            if (w == NULL)
                goto done;
            PyList_SET_ITEM(wires, k, w);
            unsigned char *out = (unsigned char *)PyBytes_AS_STRING(w);
            memcpy(out, k == j - 1 ? last_prefix : inner_prefix, PREFIX_LEN);
            memcpy(out + PREFIX_LEN, hv.views[k].buf, hlen);
            if (!gcm_data(self, out + PREFIX_LEN + hlen, pv.views[k].buf, plen))
                goto crypto_error;
        }
        PyObject *last = PyList_GET_ITEM(wires, j - 1);
        if (!gcm_get_mac(self, (unsigned char *)PyBytes_AS_STRING(last)
                         + PyBytes_GET_SIZE(last) - MAC_LEN))
            goto crypto_error;
        ctr++;
        units++;
        i = j;
    }
    result = Py_BuildValue("(On)", wires, units);
    goto done;
crypto_error:
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL: AES-GCM encryption failed");
done:
    Py_XDECREF(wires);
    release_all(&hv);
    release_all(&pv);
    PyBuffer_Release(&prefix);
    return result;
}

/* One received TLP's framing: header length (prefix included), body length (the MAC left
 * out), whether it carries the MAC.  0 if it is too short to be an IDE TLP. */
static int
framing(const unsigned char *w, Py_ssize_t len, Py_ssize_t *hlen, Py_ssize_t *blen, int *m)
{
    if (len <= PREFIX_LEN)
        return 0;
    *m = w[1] & 1;
    *hlen = PREFIX_LEN + ((w[PREFIX_LEN] & 0x20) ? 16 : 12);
    *blen = len - *hlen - (*m ? MAC_LEN : 0);
    return *blen >= 0;
}

/* open(wires, start, stop, counter, unit_tlps, joined=False)
 *     -> (plaintexts, consumed, units)
 *
 * Checks and decrypts whole units of wires[start:stop] in order, as
 * teeio.ide_runs.open_units does: a unit is the TLPs up to and including the next one with
 * M set, at most unit_tlps of them and at most 256 DW of payload when more than one.  Stops
 * before the first unit that is incomplete, breaks those limits or fails its MAC check:
 * nothing of it is returned (plaintext is only released once the MAC checks out).
 * plaintexts: a list of each TLP's payload, or with joined one bytes object of them all. */
static PyObject *
Gcm_open(GcmObject *self, PyObject *args)
{
    PyObject *wires_in;
    Py_ssize_t start, stop;
    unsigned long long counter;
    int unit_tlps, joined = 0;
    if (!PyArg_ParseTuple(args, "O!nnKi|p:open", &PyList_Type, &wires_in, &start, &stop,
                          &counter, &unit_tlps, &joined))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(wires_in);
    if (start < 0 || stop > n || start > stop || unit_tlps < 1 || unit_tlps > UNIT_TLPS_MAX) {
        PyErr_SetString(PyExc_ValueError, "open: bad range or unit size");
        return NULL;
    }
    PyObject *plains = NULL;        /* list, or with joined the bytes being filled */
    Py_ssize_t room = 0, pos = 0;   /* joined: its size, and how much is filled */
    if (joined) {
        /* The payloads' total, so that the common case (all pass) needs no resize: a
         * block of exactly the size the last one had is reused by malloc, a bigger one
         * would come fresh from the kernel, page by page. */
        for (Py_ssize_t w = start; w < stop; w++) {
            Py_buffer v;
            Py_ssize_t hlen, blen;
            int m, ok;
            if (!get_view(PyList_GET_ITEM(wires_in, w), &v)) {
                PyErr_Clear();
                break;
            }
            ok = framing(v.buf, v.len, &hlen, &blen, &m);
            release_view(&v);
            if (!ok)
                break;
            room += blen;
        }
        plains = PyBytes_FromStringAndSize(NULL, room);
    } else {
        plains = PyList_New(0);
    }
    if (plains == NULL)
        return NULL;
    Py_buffer views[UNIT_TLPS_MAX];
    PyObject *outs[UNIT_TLPS_MAX];
    Py_ssize_t hl[UNIT_TLPS_MAX], bl[UNIT_TLPS_MAX];
    uint64_t ctr = counter;
    int exhausted = 0, failed = 0;
    Py_ssize_t units = 0, i = start;
    while (i < stop && !exhausted) {
        /* the unit: TLPs up to the one with M set */
        Py_ssize_t count = 0, total = 0, k;
        int complete = 0, ok = 1;
        while (i + count < stop && count < unit_tlps) {
            Py_buffer *v = &views[count];
            if (!get_view(PyList_GET_ITEM(wires_in, i + count), v)) {
                PyErr_Clear();
                ok = 0;
                break;
            }
            int m;
            count++;
            if (!framing(v->buf, v->len, &hl[count - 1], &bl[count - 1], &m)) {
                ok = 0;
                break;
            }
            total += bl[count - 1];
            if (m) {
                complete = 1;
                break;
            }
        }
        int good = ok && complete && (count == 1 || total <= UNIT_PAYLOAD_MAX);
        Py_ssize_t unit_pos = pos;
        if (good) {
            good = gcm_start(self, ctr, 0);
            for (k = 0; good && k < count; k++)
                good = gcm_aad(self, views[k].buf, hl[k]);
            for (k = 0; k < count; k++)
                outs[k] = NULL;
            for (k = 0; good && k < count; k++) {
                unsigned char *to;
                if (joined) {
                    to = (unsigned char *)PyBytes_AS_STRING(plains) + pos;
                } else if (bl[k] == 0) {
                    Py_INCREF(empty_bytes);
                    outs[k] = empty_bytes;
                    continue;
                } else {
                    outs[k] = PyBytes_FromStringAndSize(NULL, bl[k]);
                    if (outs[k] == NULL) {
                        failed = 1;
                        break;
                    }
                    to = (unsigned char *)PyBytes_AS_STRING(outs[k]);
                }
                good = gcm_data(self, to, (const unsigned char *)views[k].buf + hl[k], bl[k]);
                if (joined)
                    pos += bl[k];
            }
            good = good && !failed && k == count
                && gcm_check_mac(self, (const unsigned char *)views[count - 1].buf
                                 + views[count - 1].len - MAC_LEN);
            for (k = 0; k < count; k++) {
                if (good && !joined && PyList_Append(plains, outs[k]) < 0)
                    failed = 1;
                Py_XDECREF(outs[k]);
            }
            if (!good && joined) {      /* unreleased plaintext of the failed unit */
                memset(PyBytes_AS_STRING(plains) + unit_pos, 0, pos - unit_pos);
                pos = unit_pos;
            }
        }
        for (k = 0; k < count; k++)
            release_view(&views[k]);
        if (failed) {
            Py_DECREF(plains);
            return NULL;
        }
        if (!good)
            break;
        if (ctr == UINT64_MAX)
            exhausted = 1;              /* the caller's counter is now past 2^64 - 1 */
        ctr++;
        units++;
        i += count;
    }
    if (joined && pos != room && _PyBytes_Resize(&plains, pos) < 0)
        return NULL;
    /* the plaintexts of the units that passed; nothing of the one that did not */
    PyObject *result = Py_BuildValue("(Onn)", plains, i - start, units);
    Py_DECREF(plains);
    return result;
}

static PyMethodDef Gcm_methods[] = {
    {"seal", (PyCFunction)Gcm_seal, METH_VARARGS,
     "seal(counter, prefix, headers, payloads, unit_tlps) -> (wires, units)"},
    {"open", (PyCFunction)Gcm_open, METH_VARARGS,
     "open(wires, start, stop, counter, unit_tlps, joined=False)"
     " -> (plaintexts, consumed, units)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GcmType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "teeio._ide_accel.Gcm",
    .tp_basicsize = sizeof(GcmObject),
    .tp_dealloc = (destructor)Gcm_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "AES-256-GCM with a 96-bit MAC for runs of IDE TLPs (one key)",
    .tp_methods = Gcm_methods,
    .tp_new = Gcm_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_ide_accel",
    .m_doc = "IDE TLP protection for runs of TLPs through libcrypto (optional accelerator)",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__ide_accel(void)
{
    if (PyType_Ready(&GcmType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    if (empty_bytes == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&GcmType);
    if (PyModule_AddObject(m, "Gcm", (PyObject *)&GcmType) < 0
            || PyModule_AddStringConstant(m, "OPENSSL_VERSION",
                                          OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(&GcmType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
