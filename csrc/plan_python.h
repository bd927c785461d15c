// Python entry points of the torch-free launch planner (plan.h), for tests and tools:
// listed in the method table of pathgeom_fast._C (python_entry.cpp).
#pragma once

#include <Python.h>

namespace pathgeom {

// plan_cuda(numels, keys, K, limits=None) -> dict (see plan.h and tests/ops/test_plan.py)
PyObject* plan_cuda_py(PyObject* self, PyObject* args, PyObject* kwargs);
// cuda_plan_limits() -> dict of the default caps
PyObject* cuda_plan_limits_py(PyObject* self, PyObject* args);

#define PATHGEOM_PLAN_METHODS                                                                   \
  {"plan_cuda", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(pathgeom::plan_cuda_py)), \
   METH_VARARGS | METH_KEYWORDS,                                                                \
   "plan_cuda(numels, keys, K, limits=None): the CUDA backend's launch plan (torch-free)"},     \
  {"cuda_plan_limits", pathgeom::cuda_plan_limits_py, METH_NOARGS,                               \
   "default caps of the CUDA launch plan"}

}  // namespace pathgeom
