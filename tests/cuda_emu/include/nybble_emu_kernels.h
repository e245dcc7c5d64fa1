// Kernel table of an emulated kernel library: for each extern "C" kernel, its name, launch
// bound and a trampoline that unpacks CuPy-style arguments (an array of pointers to each
// argument's bytes) into the kernel's parameters, with the parameter types deduced from the
// kernel's own signature. The emulator generates one table per kernel file.
#pragma once

#include <cstddef>
#include <cstdio>
#include <type_traits>
#include <utility>

namespace nybble_emu {

// What Python passed for one argument: the kind of its numpy scalar ('i' signed integer, 'u'
// unsigned integer, 'f' float, 'b' bool) and its size in bytes.
struct ArgSpec {
    char kind;
    int size;
};

struct KernelEntry {
    const char* name;
    int max_threads;  // __launch_bounds__, or the device limit of 1024
    // Writes what is wrong into `err` and returns false when the arguments do not fit.
    bool (*check)(const ArgSpec* args, int count, char* err, std::size_t err_size);
    void (*invoke)(void** args);
};

template <typename P>
const char* param_type_name() {
    if constexpr (std::is_pointer_v<P>) return "a pointer (8-byte integer)";
    else if constexpr (std::is_same_v<P, bool>) return "a bool";
    else if constexpr (std::is_integral_v<P>) return sizeof(P) == 8 ? "a 64-bit integer" : sizeof(P) == 4 ? "a 32-bit integer" : "a narrow integer";
    else if constexpr (std::is_floating_point_v<P>) return sizeof(P) == 8 ? "a float64" : "a float32";
    else return "a struct";
}

// CuPy copies each argument's bytes as they are, so a wrong width or kind (np.int64 for an
// int, a Python float for a float) reads garbage on the GPU; here it is an error.
template <typename P>
bool param_accepts(const ArgSpec& a) {
    if constexpr (std::is_pointer_v<P>) return (a.kind == 'u' || a.kind == 'i') && a.size == sizeof(P);
    else if constexpr (std::is_same_v<P, bool>) return a.kind == 'b' && a.size == 1;
    else if constexpr (std::is_integral_v<P>) return (a.kind == 'u' || a.kind == 'i') && a.size == sizeof(P);
    else if constexpr (std::is_floating_point_v<P>) return a.kind == 'f' && a.size == sizeof(P);
    else return a.size == static_cast<int>(sizeof(P));
}

template <typename Fn>
struct Trampoline;

template <typename... P>
struct Trampoline<void (*)(P...)> {
    static constexpr int kCount = sizeof...(P);

    template <std::size_t... I>
    static bool check_each(const ArgSpec* args, char* err, std::size_t err_size, std::index_sequence<I...>) {
        int bad = -1;
        const char* expected = "";
        // Left to right; stops at the first mismatch.
        (void)((param_accepts<std::remove_cv_t<P>>(args[I]) ||
                (bad = static_cast<int>(I), expected = param_type_name<std::remove_cv_t<P>>(), false)) &&
               ...);
        if (bad < 0) return true;
        std::snprintf(err, err_size, "argument %d must be %s, got a %d-byte '%c' value", bad, expected,
                      args[bad].size, args[bad].kind);
        return false;
    }

    static bool check(const ArgSpec* args, int count, char* err, std::size_t err_size) {
        if (count != kCount) {
            std::snprintf(err, err_size, "takes %d arguments, got %d", kCount, count);
            return false;
        }
        return check_each(args, err, err_size, std::index_sequence_for<P...>{});
    }

    template <auto Kernel, std::size_t... I>
    static void call(void** args, std::index_sequence<I...>) {
        Kernel(*static_cast<std::remove_cv_t<P>*>(args[I])...);
    }

    template <auto Kernel>
    static void invoke(void** args) {
        call<Kernel>(args, std::index_sequence_for<P...>{});
    }
};

template <auto Kernel>
KernelEntry make_entry(const char* name, int max_threads) {
    using T = Trampoline<decltype(Kernel)>;
    return KernelEntry{name, max_threads, &T::check, &T::template invoke<Kernel>};
}

// __launch_bounds__(max_threads, min_blocks...): the first argument.
constexpr int first_of(int max_threads, int = 0, int = 0) { return max_threads; }

}  // namespace nybble_emu

// The generated table of a kernel library ends with this: the entry point the launcher uses.
#define NYBBLE_EMU_KERNEL_TABLE(...)                                                         \
    namespace nybble_emu {                                                                   \
    const KernelEntry* kernel_table(int* count) {                                            \
        static const KernelEntry table[] = {__VA_ARGS__};                                    \
        *count = static_cast<int>(sizeof(table) / sizeof(table[0]));                        \
        return table;                                                                        \
    }                                                                                        \
    }
