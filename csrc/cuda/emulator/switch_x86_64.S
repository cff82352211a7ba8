// flashattn_emu_switch(void** save_sp, void* load_sp): saves the callee-saved registers, MXCSR
// and the x87 control word on the current stack, stores the stack pointer in *save_sp, loads
// load_sp and restores the same from there (System V AMD64 ABI). flashattn_emu_trampoline is
// where a fresh fiber starts (fiber.cpp builds its first frame): it calls r12(r13).
#if defined(__x86_64__)
        .text
        .globl  flashattn_emu_switch
        .hidden flashattn_emu_switch
        .type   flashattn_emu_switch, @function
flashattn_emu_switch:
        pushq   %rbp
        pushq   %rbx
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        subq    $8, %rsp
        stmxcsr (%rsp)
        fnstcw  4(%rsp)
        movq    %rsp, (%rdi)
        movq    %rsi, %rsp
        ldmxcsr (%rsp)
        fldcw   4(%rsp)
        addq    $8, %rsp
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %rbx
        popq    %rbp
        ret
        .size   flashattn_emu_switch, .-flashattn_emu_switch

        .globl  flashattn_emu_trampoline
        .hidden flashattn_emu_trampoline
        .type   flashattn_emu_trampoline, @function
flashattn_emu_trampoline:
        movq    %r13, %rdi
        callq   *%r12
        ud2
        .size   flashattn_emu_trampoline, .-flashattn_emu_trampoline
#endif
        .section .note.GNU-stack,"",@progbits
