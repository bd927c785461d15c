// See plan_python.h. Plain CPython API: no torch here.
#include "plan_python.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "plan.h"

namespace pathgeom {
namespace {

struct Ref {  // owns one reference
  PyObject* p;
  explicit Ref(PyObject* o) : p(o) {}
  ~Ref() { Py_XDECREF(p); }
  PyObject* release() { PyObject* o = p; p = nullptr; return o; }
};

template <typename T>
bool to_vector(PyObject* seq, const char* what, std::vector<T>& out) {
  Ref fast(PySequence_Fast(seq, what));
  if (!fast.p) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.p);
  out.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast.p, i));
    if (v == -1 && PyErr_Occurred()) return false;
    out[i] = static_cast<T>(v);
  }
  return true;
}

PyObject* list_of(const std::vector<int64_t>& v) {
  PyObject* l = PyList_New(static_cast<Py_ssize_t>(v.size()));
  if (!l) return nullptr;
  for (size_t i = 0; i < v.size(); ++i) PyList_SET_ITEM(l, i, PyLong_FromLongLong(v[i]));
  return l;
}

bool set_item(PyObject* d, const char* k, PyObject* v) {  // steals v
  if (!v) return false;
  const int rc = PyDict_SetItemString(d, k, v);
  Py_DECREF(v);
  return rc == 0;
}

PyObject* limits_dict(const CudaPlanLimits& l) {
  Ref d(PyDict_New());
  if (!d.p || !set_item(d.p, "max_tensors", PyLong_FromLongLong(l.max_tensors)) ||
      !set_item(d.p, "max_ptrs", PyLong_FromLongLong(l.max_ptrs)) ||
      !set_item(d.p, "max_grads_per_pass", PyLong_FromLongLong(l.max_grads_per_pass)) ||
      !set_item(d.p, "chunk", PyLong_FromLongLong(l.chunk)) ||
      !set_item(d.p, "max_blocks", PyLong_FromLongLong(l.max_blocks))) {
    return nullptr;
  }
  return d.release();
}

bool read_limit(PyObject* d, const char* k, int64_t* out) {
  PyObject* v = PyDict_GetItemString(d, k);  // borrowed
  if (!v) return true;
  const long long x = PyLong_AsLongLong(v);
  if (x == -1 && PyErr_Occurred()) return false;
  *out = x;
  return true;
}

}  // namespace

PyObject* cuda_plan_limits_py(PyObject*, PyObject*) { return limits_dict(CudaPlanLimits()); }

PyObject* plan_cuda_py(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"numels", "keys", "K", "limits", nullptr};
  PyObject *numels_obj, *keys_obj, *limits_obj = Py_None;
  long long K;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOL|O", const_cast<char**>(kwlist), &numels_obj,
                                   &keys_obj, &K, &limits_obj)) {
    return nullptr;
  }
  std::vector<int64_t> numel;
  std::vector<int32_t> key;
  if (!to_vector(numels_obj, "numels must be a sequence of ints", numel) ||
      !to_vector(keys_obj, "keys must be a sequence of ints", key)) {
    return nullptr;
  }
  if (numel.size() != key.size()) {
    PyErr_SetString(PyExc_ValueError, "plan_cuda: numels and keys differ in length");
    return nullptr;
  }
  CudaPlanLimits lim;
  if (limits_obj != Py_None) {
    if (!PyDict_Check(limits_obj)) {
      PyErr_SetString(PyExc_TypeError, "plan_cuda: limits must be a dict");
      return nullptr;
    }
    if (!read_limit(limits_obj, "max_tensors", &lim.max_tensors) ||
        !read_limit(limits_obj, "max_ptrs", &lim.max_ptrs) ||
        !read_limit(limits_obj, "max_grads_per_pass", &lim.max_grads_per_pass) ||
        !read_limit(limits_obj, "chunk", &lim.chunk) ||
        !read_limit(limits_obj, "max_blocks", &lim.max_blocks)) {
      return nullptr;
    }
  }
  CudaPlan plan;
  try {
    plan = plan_cuda(numel.data(), key.data(), static_cast<int64_t>(numel.size()), K, lim);
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Ref out(PyDict_New());
  Ref passes(PyList_New(0));
  Ref launches(PyList_New(0));
  if (!out.p || !passes.p || !launches.p) return nullptr;
  for (const auto& p : plan.passes) {
    Ref t(Py_BuildValue("(LL)", static_cast<long long>(p.first), static_cast<long long>(p.second)));
    if (!t.p || PyList_Append(passes.p, t.p) != 0) return nullptr;
  }
  for (const auto& L : plan.launches) {
    Ref d(PyDict_New());
    if (!d.p || !set_item(d.p, "key", PyLong_FromLong(L.key)) ||
        !set_item(d.p, "chunk_offset", PyLong_FromLongLong(L.chunk_offset)) ||
        !set_item(d.p, "tensors", list_of(L.tensors)) ||
        !set_item(d.p, "chunk_start", list_of(L.chunk_start)) || PyList_Append(launches.p, d.p) != 0) {
      return nullptr;
    }
  }
  if (!set_item(out.p, "total_chunks", PyLong_FromLongLong(plan.total_chunks)) ||
      !set_item(out.p, "passes", passes.release()) || !set_item(out.p, "launches", launches.release()) ||
      !set_item(out.p, "limits", limits_dict(lim))) {
    return nullptr;
  }
  return out.release();
}

}  // namespace pathgeom
