// Reading the int arguments of a METH_FASTCALL entry point.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>

namespace sb {

inline PyObject* arg_error(const char* what) {
  PyErr_SetString(PyExc_TypeError, what);
  return nullptr;
}

inline bool read_ints(PyObject* const* args, Py_ssize_t n, int64_t* out) {
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[i] = PyLong_AsLongLong(args[i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

}  // namespace sb
