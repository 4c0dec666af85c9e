/* Buffer-protocol helpers shared by meshwright's C kernels (_textcut.c, _pcapcut.c). */
#ifndef MESHWRIGHT_BUFFERS_H
#define MESHWRIGHT_BUFFERS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* A borrowed C-contiguous buffer; `held` says whether it must be released. */
typedef struct {
    Py_buffer view;
    int held;
} Buf;

/* Borrow obj's buffer; its length must be a multiple of itemsize. -1 with an exception. */
static int get_buf(PyObject *obj, Buf *b, Py_ssize_t itemsize, const char *what) {
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    b->held = 1;
    if (itemsize > 1 && b->view.len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: length is not a multiple of %zd", what, itemsize);
        return -1;
    }
    return 0;
}

static void rel_buf(Buf *b) {
    if (b->held) PyBuffer_Release(&b->view);
    b->held = 0;
}

#endif
