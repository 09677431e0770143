/*
 * devicegate._speedups: the compiled fast path of Authenticator.
 *
 * FastPath.admit(headers) returns the Principal of a request that the pure-Python
 * Authenticator.authenticate would admit with that same Principal, or None. It never refuses
 * and never raises for a request: None only means "decide in full", and the caller then runs
 * the Python code, which gives every answer, every refusal and every error. So this file can
 * only make an admission faster, never decide one that Python would not; anything unusual
 * (an unknown spelling, a duplicate, a cache miss, an expired entry, a type it does not
 * expect) is None.
 *
 * What it admits, each exactly as _credentials.read_credential, Authenticator.authenticate
 * and TokenVerifier.check decide it:
 *   - an API key header with no Authorization, equal to a configured API key;
 *   - a one-word Authorization equal to a configured mobile key;
 *   - "Authorization: Bearer <token>" whose token is in the verifier's cache, inside its
 *     validity window by the verifier's clock, and (when bound) with a device header equal
 *     to the bound id.
 * Keys and device ids are compared in time that does not depend on where they differ.
 *
 * Cached tokens are admitted only through the verifier in the `verifier` attribute, which the
 * Authenticator keeps set to its own, and only while `verifier.check` is TokenVerifier.check
 * itself: a subclass, an instance or a patch that puts another check there always decides.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* As _credentials.MAX_CREDENTIAL_BYTES; a test checks that the two agree. */
#define MAX_CREDENTIAL_BYTES 8192

static const char AUTHORIZATION[] = "authorization";
static const char BEARER_PREFIX[] = "Bearer ";
#define AUTHORIZATION_LENGTH ((Py_ssize_t)(sizeof(AUTHORIZATION) - 1))
#define BEARER_PREFIX_LENGTH ((Py_ssize_t)(sizeof(BEARER_PREFIX) - 1))

/* Module state kept in statics: the module has no per-interpreter data beyond these. */
static PyObject *ordered_dict_type;  /* collections.OrderedDict */
static PyObject *str_cache;          /* interned attribute and method names */
static PyObject *str_check;
static PyObject *str_clock;
static PyObject *str_move_to_end;

typedef struct {
    PyObject_HEAD
    PyObject *verifier;       /* a TokenVerifier, or NULL: then no token is admitted here */
    PyObject *check;          /* the function TokenVerifier.check, which this code mirrors */
    PyObject *api_key_header; /* bytes */
    PyObject *device_header;  /* bytes */
    PyObject *api_keys;       /* tuple of bytes */
    PyObject *mobile_keys;    /* tuple of bytes */
    PyObject *api_principal;
    PyObject *mobile_principal;
} FastPath;

/* What the comparisons below have done, for the tests (as a spy on hmac.compare_digest shows
   it for the Python path): how many, and how many of the client's bytes they visited. */
static unsigned long long comparisons_made;
static unsigned long long bytes_compared;

/*
 * Whether the client's bytes equal a secret, in time that depends on the client's length
 * only: every byte of the candidate is visited whether or not the lengths agree (against
 * itself when they do not), and nothing stops early.
 */
static int
equal_in_constant_time(const char *secret, Py_ssize_t secret_length, const char *candidate,
                       Py_ssize_t candidate_length)
{
    const volatile unsigned char *left;
    const volatile unsigned char *right = (const volatile unsigned char *)candidate;
    volatile unsigned char difference;
    Py_ssize_t i;

    if (secret_length == candidate_length) {
        left = (const volatile unsigned char *)secret;
        difference = 0;
    }
    else {
        left = right;
        difference = 1;
    }
    for (i = 0; i < candidate_length; i++) {
        difference |= left[i] ^ right[i];
    }
    comparisons_made++;
    bytes_compared += (unsigned long long)i;
    return difference == 0;
}

/* Whether the candidate equals one of the keys; every key is compared. */
static int
matches_a_key(PyObject *keys, const char *candidate, Py_ssize_t length)
{
    Py_ssize_t i, count = PyTuple_GET_SIZE(keys);
    int found = 0;

    for (i = 0; i < count; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        found |= equal_in_constant_time(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                                        candidate, length);
    }
    return found;
}

static int
bytes_equal(PyObject *value, const char *text, Py_ssize_t length)
{
    return PyBytes_GET_SIZE(value) == length
           && memcmp(PyBytes_AS_STRING(value), text, (size_t)length) == 0;
}

/* Whether a value is the word "bearer" in any ASCII case, as bytes.lower() folds it. */
static int
is_bare_bearer(const char *value, Py_ssize_t length)
{
    static const char bearer[] = "bearer";
    Py_ssize_t i;

    if (length != (Py_ssize_t)(sizeof(bearer) - 1)) {
        return 0;
    }
    for (i = 0; i < length; i++) {
        char c = value[i];
        if (c >= 'A' && c <= 'Z') {
            c = (char)(c - 'A' + 'a');
        }
        if (c != bearer[i]) {
            return 0;
        }
    }
    return 1;
}

/*
 * Leave the decision to the full path: forget an ordinary error (the full path meets it again
 * and answers it), but let KeyboardInterrupt, SystemExit and their kind through.
 */
static int
decline(void)
{
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    PyErr_Clear();
    return 0;
}

/*
 * The cached-token decision. Sets *principal to a new reference when admitted, leaves it NULL
 * to decide in full; returns -1 only with an exception that must propagate.
 */
static int
admit_cached_token(FastPath *self, PyObject *token, PyObject *device, PyObject **principal)
{
    PyObject *verifier = self->verifier, *check = NULL, *cache = NULL, *clock = NULL;
    PyObject *entry = NULL, *now = NULL, *moved = NULL;
    PyObject *expires_at, *valid_from, *bound;
    int in_window, status;

    *principal = NULL;
    if (verifier == NULL) {
        return 0;
    }
    Py_INCREF(verifier); /* Python code below may replace self->verifier */
    /* What the full path would call, looked up as it looks it up: TokenVerifier.check bound to
       this verifier, or another check that must decide for itself. */
    check = PyObject_GetAttr(verifier, str_check);
    if (check == NULL || !PyMethod_Check(check) || PyMethod_GET_FUNCTION(check) != self->check
        || PyMethod_GET_SELF(check) != verifier) {
        goto done;
    }
    cache = PyObject_GetAttr(verifier, str_cache);
    /* Only the exact OrderedDict the verifier makes: a subclass could answer differently. */
    if (cache == NULL || (PyObject *)Py_TYPE(cache) != ordered_dict_type) {
        goto done;
    }
    entry = PyDict_GetItemWithError(cache, token);
    if (entry == NULL) {
        goto done;
    }
    Py_INCREF(entry); /* the clock below runs Python code, which may evict it */
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 4) {
        goto done;
    }
    expires_at = PyTuple_GET_ITEM(entry, 0);
    valid_from = PyTuple_GET_ITEM(entry, 1);
    bound = PyTuple_GET_ITEM(entry, 2);

    clock = PyObject_GetAttr(verifier, str_clock);
    if (clock == NULL) {
        goto done;
    }
    now = PyObject_CallNoArgs(clock);
    if (now == NULL) {
        goto done;
    }
    /* valid_from <= now < expires_at, compared as Python compares them (ints stay exact). */
    in_window = PyObject_RichCompareBool(valid_from, now, Py_LE);
    if (in_window == 1) {
        in_window = PyObject_RichCompareBool(now, expires_at, Py_LT);
    }
    if (in_window != 1) {
        goto done; /* outside it: the full path forgets the entry and gives the reason */
    }
    moved = PyObject_CallMethodOneArg(cache, str_move_to_end, token);
    if (moved == NULL) {
        goto done; /* evicted meanwhile: the full path decides */
    }
    if (bound == Py_None
        || (device != NULL && PyBytes_CheckExact(bound)
            && equal_in_constant_time(PyBytes_AS_STRING(bound), PyBytes_GET_SIZE(bound),
                                      PyBytes_AS_STRING(device), PyBytes_GET_SIZE(device)))) {
        *principal = Py_NewRef(PyTuple_GET_ITEM(entry, 3));
    }

done:
    status = decline();
    Py_XDECREF(moved);
    Py_XDECREF(now);
    Py_XDECREF(clock);
    Py_XDECREF(entry);
    Py_XDECREF(cache);
    Py_XDECREF(check);
    Py_DECREF(verifier);
    if (status < 0) {
        Py_CLEAR(*principal);
    }
    return status;
}

PyDoc_STRVAR(admit_doc,
"admit(headers, /)\n--\n\n"
"The principal Authenticator.authenticate(headers) would return, or None to decide in full.");

static PyObject *
FastPath_admit(FastPath *self, PyObject *headers)
{
    PyObject *authorization = NULL, *api_key = NULL, *device = NULL;
    PyObject *token, *principal;
    const char *value;
    Py_ssize_t i, count, length;
    int status;

    if (self->api_keys == NULL || !PyList_CheckExact(headers)) {
        Py_RETURN_NONE; /* never initialised (or cleared by the collector), or no plain list */
    }
    /* No Python code runs in this loop, so the list cannot change under it. */
    count = PyList_GET_SIZE(headers);
    for (i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(headers, i);
        PyObject *name, *field;
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) {
            Py_RETURN_NONE;
        }
        name = PyTuple_GET_ITEM(item, 0);
        field = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(field)) {
            Py_RETURN_NONE;
        }
        /* The order of read_credential's if/elif chain. A duplicate is refused there. */
        if (bytes_equal(name, AUTHORIZATION, AUTHORIZATION_LENGTH)) {
            if (authorization != NULL) {
                Py_RETURN_NONE;
            }
            authorization = field;
        }
        else if (bytes_equal(name, PyBytes_AS_STRING(self->api_key_header),
                             PyBytes_GET_SIZE(self->api_key_header))) {
            if (api_key != NULL) {
                Py_RETURN_NONE;
            }
            api_key = field;
        }
        else if (bytes_equal(name, PyBytes_AS_STRING(self->device_header),
                             PyBytes_GET_SIZE(self->device_header))) {
            if (device != NULL) {
                Py_RETURN_NONE;
            }
            device = field;
        }
    }

    if (api_key != NULL) {
        length = PyBytes_GET_SIZE(api_key);
        if (authorization != NULL || length == 0 || length > MAX_CREDENTIAL_BYTES) {
            Py_RETURN_NONE;
        }
        if (matches_a_key(self->api_keys, PyBytes_AS_STRING(api_key), length)) {
            return Py_NewRef(self->api_principal);
        }
        Py_RETURN_NONE;
    }
    if (authorization == NULL) {
        Py_RETURN_NONE;
    }
    value = PyBytes_AS_STRING(authorization);
    length = PyBytes_GET_SIZE(authorization);
    if (length == 0 || length > MAX_CREDENTIAL_BYTES || memchr(value, '\t', (size_t)length)) {
        Py_RETURN_NONE;
    }
    if (length > BEARER_PREFIX_LENGTH
        && memcmp(value, BEARER_PREFIX, (size_t)BEARER_PREFIX_LENGTH) == 0) {
        if (memchr(value + BEARER_PREFIX_LENGTH, ' ', (size_t)(length - BEARER_PREFIX_LENGTH))) {
            Py_RETURN_NONE;
        }
        /* Both stay alive while Python code runs: the references keep them. */
        Py_XINCREF(device);
        token = PyBytes_FromStringAndSize(value + BEARER_PREFIX_LENGTH,
                                          length - BEARER_PREFIX_LENGTH);
        if (token == NULL) {
            Py_XDECREF(device);
            return NULL; /* out of memory: as the full path's slicing would be */
        }
        status = admit_cached_token(self, token, device, &principal);
        Py_DECREF(token);
        Py_XDECREF(device);
        if (status < 0) {
            return NULL;
        }
        if (principal == NULL) {
            Py_RETURN_NONE;
        }
        return principal;
    }
    /* A single word is the mobile key; "Bearer" alone (any case) is not, and every other
       spelling with a space is left to the full path. */
    if (memchr(value, ' ', (size_t)length) || is_bare_bearer(value, length)) {
        Py_RETURN_NONE;
    }
    if (matches_a_key(self->mobile_keys, value, length)) {
        return Py_NewRef(self->mobile_principal);
    }
    Py_RETURN_NONE;
}

static int
is_tuple_of_bytes(PyObject *value)
{
    Py_ssize_t i;
    if (!PyTuple_CheckExact(value)) {
        return 0;
    }
    for (i = 0; i < PyTuple_GET_SIZE(value); i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(value, i))) {
            return 0;
        }
    }
    return 1;
}

static int
FastPath_init(FastPath *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"check", "api_key_header", "device_header", "api_keys",
                               "mobile_keys", "api_principal", "mobile_principal", NULL};
    PyObject *check, *api_key_header, *device_header, *api_keys, *mobile_keys;
    PyObject *api_principal, *mobile_principal;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOO:FastPath", keywords, &check,
                                     &api_key_header, &device_header, &api_keys, &mobile_keys,
                                     &api_principal, &mobile_principal)) {
        return -1;
    }
    if (!PyFunction_Check(check)) {
        PyErr_SetString(PyExc_TypeError, "check must be the function TokenVerifier.check");
        return -1;
    }
    if (!PyBytes_CheckExact(api_key_header) || !PyBytes_CheckExact(device_header)) {
        PyErr_SetString(PyExc_TypeError, "header names must be bytes");
        return -1;
    }
    if (!is_tuple_of_bytes(api_keys) || !is_tuple_of_bytes(mobile_keys)) {
        PyErr_SetString(PyExc_TypeError, "keys must be tuples of bytes");
        return -1;
    }
    Py_XSETREF(self->check, Py_NewRef(check));
    Py_XSETREF(self->api_key_header, Py_NewRef(api_key_header));
    Py_XSETREF(self->device_header, Py_NewRef(device_header));
    Py_XSETREF(self->api_keys, Py_NewRef(api_keys));
    Py_XSETREF(self->mobile_keys, Py_NewRef(mobile_keys));
    Py_XSETREF(self->api_principal, Py_NewRef(api_principal));
    Py_XSETREF(self->mobile_principal, Py_NewRef(mobile_principal));
    return 0;
}

static int
FastPath_traverse(FastPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->verifier);
    Py_VISIT(self->check);
    Py_VISIT(self->api_key_header);
    Py_VISIT(self->device_header);
    Py_VISIT(self->api_keys);
    Py_VISIT(self->mobile_keys);
    Py_VISIT(self->api_principal);
    Py_VISIT(self->mobile_principal);
    return 0;
}

static int
FastPath_clear(FastPath *self)
{
    Py_CLEAR(self->verifier);
    Py_CLEAR(self->check);
    Py_CLEAR(self->api_key_header);
    Py_CLEAR(self->device_header);
    Py_CLEAR(self->api_keys);
    Py_CLEAR(self->mobile_keys);
    Py_CLEAR(self->api_principal);
    Py_CLEAR(self->mobile_principal);
    return 0;
}

static void
FastPath_dealloc(FastPath *self)
{
    PyObject_GC_UnTrack(self);
    FastPath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
FastPath_repr(FastPath *self)
{
    /* Never the keys: a repr ends up in logs. */
    return PyUnicode_FromString("<devicegate._speedups.FastPath>");
}

PyDoc_STRVAR(comparisons_doc,
"_comparisons()\n--\n\n"
"For tests: (comparisons made, client bytes visited) by the constant-time comparison so far.");

static PyObject *
speedups_comparisons(PyObject *module, PyObject *unused)
{
    return Py_BuildValue("(KK)", comparisons_made, bytes_compared);
}

static PyMethodDef speedups_functions[] = {
    {"_comparisons", speedups_comparisons, METH_NOARGS, comparisons_doc},
    {NULL, NULL, 0, NULL},
};

static PyObject *
FastPath_get_verifier(FastPath *self, void *closure)
{
    if (self->verifier == NULL) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(self->verifier);
}

static int
FastPath_set_verifier(FastPath *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "set the verifier to None instead");
        return -1;
    }
    if (value == Py_None) {
        Py_CLEAR(self->verifier);
    Py_CLEAR(self->check);
    }
    else {
        Py_XSETREF(self->verifier, Py_NewRef(value));
    }
    return 0;
}

static PyGetSetDef FastPath_getset[] = {
    {"verifier", (getter)FastPath_get_verifier, (setter)FastPath_set_verifier,
     "The TokenVerifier whose cached tokens are admitted here, or None for none.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef FastPath_methods[] = {
    {"admit", (PyCFunction)FastPath_admit, METH_O, admit_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(FastPath_doc,
"FastPath(check, api_key_header, device_header, api_keys, mobile_keys, api_principal, "
"mobile_principal)\n--\n\n"
"Admits the requests an Authenticator admits on its common paths; None means decide in full.");

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "devicegate._speedups.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_repr = (reprfunc)FastPath_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = FastPath_doc,
    .tp_traverse = (traverseproc)FastPath_traverse,
    .tp_clear = (inquiry)FastPath_clear,
    .tp_methods = FastPath_methods,
    .tp_getset = FastPath_getset,
    .tp_init = (initproc)FastPath_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "devicegate._speedups",
    .m_doc = "The compiled fast path of devicegate's Authenticator.",
    .m_size = -1,
    .m_methods = speedups_functions,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *module, *collections;

    if (PyType_Ready(&FastPathType) < 0) {
        return NULL;
    }
    if (str_cache == NULL && (str_cache = PyUnicode_InternFromString("_cache")) == NULL) {
        return NULL;
    }
    if (str_check == NULL && (str_check = PyUnicode_InternFromString("check")) == NULL) {
        return NULL;
    }
    if (str_clock == NULL && (str_clock = PyUnicode_InternFromString("_clock")) == NULL) {
        return NULL;
    }
    if (str_move_to_end == NULL
        && (str_move_to_end = PyUnicode_InternFromString("move_to_end")) == NULL) {
        return NULL;
    }
    if (ordered_dict_type == NULL) {
        collections = PyImport_ImportModule("collections");
        if (collections == NULL) {
            return NULL;
        }
        ordered_dict_type = PyObject_GetAttrString(collections, "OrderedDict");
        Py_DECREF(collections);
        if (ordered_dict_type == NULL) {
            return NULL;
        }
    }
    module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&FastPathType);
    if (PyModule_AddObject(module, "FastPath", (PyObject *)&FastPathType) < 0) {
        Py_DECREF(&FastPathType);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "MAX_CREDENTIAL_BYTES", MAX_CREDENTIAL_BYTES) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
